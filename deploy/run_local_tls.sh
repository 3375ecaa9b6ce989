#!/usr/bin/env bash
# A complete Flower deployment of fedlora on one machine: TLS + node authentication.
#
#   deploy/run_local_tls.sh                      # SuperLink + 3 SuperNodes (ranks 2, 4, 8), then `flwr run`
#   deploy/run_local_tls.sh -c "num-server-rounds=2"     # extra arguments go to `flwr run`
#   RANKS="4 16" DEVICE=cuda:0 deploy/run_local_tls.sh   # 2 nodes on a GPU
#   INSECURE=1 deploy/run_local_tls.sh           # no TLS, no node auth: local experiments ONLY
#
# Environment: WORK (default runs/deploy-local: certs, logs, FLWR_HOME, node caches), SUPERLINK_PORT
# (9200), NODE_PORT0 (9301; node i uses NODE_PORT0+i), RANKS ("2 4 8"), DEVICE (auto), DATA_PATH
# (node config data-path, {i} = the node's index, e.g. data/node{i}.jsonl; empty = each node trains
# on its partition of the run's data), KEEP=1 (leave the daemons up after the run).
# The ServerApp waits for as many nodes as this script starts (`-c min-nodes=N`, before your
# arguments, so `-c min-nodes=...` of yours wins). Every process this script starts runs under
# fedlora/reaper.py: on exit, Ctrl-C, or even `kill -9` of this script, each daemon ends with all
# it started (Flower detaches its superexec and ServerApp processes; the reaper still ends them).
set -euo pipefail
set -m  # job control: every background daemon gets its own process group (PGID = its PID)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${WORK:-$ROOT/runs/deploy-local}" && cd "${WORK:-$ROOT/runs/deploy-local}" && pwd)
HOST=127.0.0.1
PORT=${SUPERLINK_PORT:-9200}
NODE_PORT0=${NODE_PORT0:-9301}
read -r -a RANK_LIST <<< "${RANKS:-2 4 8}"
N=${#RANK_LIST[@]}
DEVICE=${DEVICE:-auto}
PY=${PYTHON:-python}
REAPER=("$PY" "$ROOT/fedlora/reaper.py" --parent $$ --)
CONN=fedlora-local
APP=${APP:-$ROOT}

export FLWR_HOME="$WORK/flwr-home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME" "$WORK/logs"

PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT INT TERM

wait_port() {  # wait_port PORT SECONDS
  local t=0
  until (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; do
    sleep 0.2; t=$((t + 1))
    if [ "$t" -gt $(($2 * 5)) ]; then echo "nothing listening on $HOST:$1 (see $WORK/logs)" >&2; exit 1; fi
  done
}

if [ "${INSECURE:-0}" = 1 ]; then
  echo "WARNING: INSECURE=1: no TLS, no node authentication. Local experiments only." >&2
  LINK_SEC=(--insecure)
  NODE_SEC=(--insecure)
  printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "%s:%s"\ninsecure = true\n' \
    "$CONN" "$CONN" "$HOST" "$PORT" > "$FLWR_HOME/config.toml"
else
  # 1. certificates: a local CA, a server cert for 127.0.0.1/localhost, one ECDSA key per node
  "$PY" -m fedlora.certs "$WORK/certs" --host "$HOST" --host localhost --nodes "$N"
  LINK_SEC=(--ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.pem"
            --ssl-keyfile "$WORK/certs/server.key" --enable-supernode-auth)
  NODE_SEC=(--root-certificates "$WORK/certs/ca.crt")
  printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "%s:%s"\nroot-certificates = "%s"\n' \
    "$CONN" "$CONN" "$HOST" "$PORT" "$WORK/certs/ca.crt" > "$FLWR_HOME/config.toml"
fi

# 2. the SuperLink (one HTTP(S) port serves the Fleet, Control and Runtime APIs)
"${REAPER[@]}" flower-superlink --host "$HOST" --port "$PORT" "${LINK_SEC[@]}" \
  --disable-runtime-dependency-installation --database "$WORK/superlink.db" \
  > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT" 60
echo "SuperLink up on $HOST:$PORT (log: $WORK/logs/superlink.log)"

# 3. register every node's public key (node authentication), then start the SuperNodes
for i in $(seq 0 $((N - 1))); do
  if [ "${INSECURE:-0}" != 1 ]; then
    for _ in $(seq 1 30); do
      flwr supernode register "$WORK/certs/nodes/node$i.pub" "$CONN" --name "node$i" \
        >> "$WORK/logs/register.log" 2>&1 && break
      sleep 1
    done
    AUTH=(--auth-supernode-private-key "$WORK/certs/nodes/node$i")
  else
    AUTH=()
  fi
  NODE_CONFIG="rank=${RANK_LIST[$i]} device=\"$DEVICE\" partition-id=$i num-partitions=$N cache-dir=\"$WORK/node-cache/node$i\""
  if [ -n "${DATA_PATH:-}" ]; then NODE_CONFIG="$NODE_CONFIG data-path=\"${DATA_PATH//\{i\}/$i}\""; fi
  "${REAPER[@]}" flower-supernode --superlink "$HOST:$PORT" --host "$HOST" --port $((NODE_PORT0 + i)) \
    "${NODE_SEC[@]}" "${AUTH[@]}" --node-config "$NODE_CONFIG" \
    > "$WORK/logs/node$i.log" 2>&1 &
  PIDS+=($!)
  echo "SuperNode node$i: rank=${RANK_LIST[$i]} device=$DEVICE (log: $WORK/logs/node$i.log)"
done

# 4. run the app (the connection fedlora-local is in $FLWR_HOME/config.toml)
cd "$APP"
flwr run . "$CONN" --stream -c "min-nodes=$N" "$@"
flwr supernode list "$CONN" || true

if [ "${KEEP:-0}" = 1 ]; then
  echo "daemons still up (FLWR_HOME=$FLWR_HOME); Ctrl-C stops them"
  wait
fi
