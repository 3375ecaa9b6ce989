#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (issue 17): the `-m gpu` tests, then a causal-LM
# client's step against plain PEFT + transformers (tokens/s ratio, peak GPU memory) with a bf16
# base, with gradient checkpointing, with a 4-bit base (bitsandbytes) and on GPT-2's Conv1D layers.
#
#   bash benchmarks/gpu_check.sh [OUT] [all|tests|steps]   # logs to OUT (default $OUT, else gpu-check/)
#
# `tests` takes at most 280 s, `steps` at most 4 x 120 s: where one command may run 10 minutes,
# run them as two commands.
# Needs torch with CUDA and fedlora's dependencies importable (the preflight below names any that
# is missing, before anything runs; on a bare machine carry the wheels of benchmarks/gpu_wheels.txt
# and install them with --no-deps into a folder on PYTHONPATH). Every step has a time limit, so a
# hang costs minutes, not the machine: about 6-8 minutes in all (estimated, not yet run on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
what=${2:-all}
mkdir -p "$out"
# `python benchmarks/lm_step.py` puts benchmarks/ on the path, not the repository: add it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" - <<'PY' 2>&1 | tee -a "$out/gpu.txt" || exit 1
import importlib, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
missing = []
for name in ("fedlora", "flwr", "opacus", "peft", "transformers", "datasets", "pydantic", "tomli_w",
             "cryptography", "google.protobuf", "grpc", "pyarrow", "accelerate", "bitsandbytes",
             "pytest", "pytest_timeout", "clients.app", "server.app"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", ""))
    except Exception as e:  # noqa: BLE001 - reported, then the script stops
        missing.append(f"{name}: {type(e).__name__}: {e}")
if missing or not torch.cuda.is_available():
    print("preflight failed:", *missing, "" if torch.cuda.is_available() else "no CUDA", sep="\n  ")
    sys.exit(1)
PY
if [[ $what != steps ]]; then
  timeout 280 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider --timeout 120 \
    tests/test_causal_lm.py tests/test_qlora.py tests/test_privacy.py tests/test_train.py 2>&1 | tee "$out/pytest-gpu.txt" || status=1
fi
[[ $what == tests ]] && exit $status
# a 0.47B-parameter Llama (hidden 2048, 8 layers, vocabulary 32,000), built once, batch 8 x 512; the
# model folder stays out of $OUT (what comes back is small files only)
model=$(mktemp -d)/llama
llama=(--hidden 2048 --layers 8 --vocab 32000 --keep "$model" --batch 8 --seq 512 --reps 3 --steps 5
       --device cuda)
step() {  # step NAME ARGS...: one comparison, at most 120 s
  local name=$1; shift
  timeout 120 "$py" benchmarks/lm_step.py "$@" 2>&1 | tee "$out/lm_step-$name.txt" || status=1
}
step bf16 "${llama[@]}"
step bf16-gc "${llama[@]}" --gradient-checkpointing
step 4bit "${llama[@]}" --quantize 4bit
step gpt2 --arch gpt2 --hidden 1024 --layers 8 --vocab 32000 --batch 8 --seq 512 --reps 3 --steps 5 --device cuda
rm -rf "$(dirname "$model")"
exit $status
