#!/usr/bin/env bash
# Regenerate fedlora/proto/ from proto/fedlora/v1/*.proto (needs grpcio-tools: pip install -e ".[dev]").
# Usage: proto/generate.sh [OUT_DIR]   (default fedlora/proto; PYTHON=... picks the interpreter).
# The output is committed; tests/test_checkpoint.py checks it matches the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-fedlora/proto}"
mkdir -p "$out/fedlora/v1"
"${PYTHON:-python}" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" proto/fedlora/v1/*.proto
touch "$out/__init__.py" "$out/fedlora/__init__.py" "$out/fedlora/v1/__init__.py"
