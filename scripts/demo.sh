#!/usr/bin/env bash
# The README's run command (`make demo`): a local Prefect server, a process work pool, the deployments,
# a worker, and one run of curate-and-distill/demo (or the deployment named as the first argument:
# `make demo-light` runs curate-and-distill/demo-light) on the embedded toy world, followed in this terminal by
# scripts/watch_run.py (every stage's progress lines, cache hits, training loss; exits non-zero if it failed).
# `make demo-stop` stops the server and worker this started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.demo
PORT=${DEMO_PORT:-4200}
DEPLOYMENT=${1:-demo}
mkdir -p "$STATE"
export PATH=$ROOT/.venv/bin:$PATH
export PREFECT_HOME=$STATE/prefect
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$PORT
export SD_DISTILL_STORE=${SD_DISTILL_STORE:-$ROOT/runs/store}
export CAD_CODE_DIR=$ROOT CAD_CPU_POOL=local CAD_GPU_POOL=local
export PREFECT_LOGGING_LEVEL=${PREFECT_LOGGING_LEVEL:-INFO}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! alive "$STATE/server.pid"; then
  echo "==> starting the Prefect server on http://127.0.0.1:$PORT (log: .demo/server.log)"
  setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/server.pid"
fi
for _ in $(seq 1 120); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "Prefect server did not start; see .demo/server.log"; exit 1; }

prefect work-pool inspect local >/dev/null 2>&1 || prefect work-pool create local --type process >/dev/null
echo "==> deploying deploy/prefect.yaml"
prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml >"$STATE/deploy.log" 2>&1 \
  || { cat "$STATE/deploy.log"; exit 1; }

if ! alive "$STATE/worker.pid"; then
  echo "==> starting a process worker on pool 'local' (log: .demo/worker.log)"
  setsid prefect worker start --pool local --type process >"$STATE/worker.log" 2>&1 &
  echo $! >"$STATE/worker.pid"
fi

echo "==> running curate-and-distill/$DEPLOYMENT (the same lines are in the Prefect UI; log: .demo/run.log)"
start=$(date +%s)
python scripts/watch_run.py "curate-and-distill/$DEPLOYMENT" | tee "$STATE/run.log"
echo "==> finished in $(( $(date +%s) - start ))s"
echo
if [ -f "$SD_DISTILL_STORE/latest-summary.md" ]; then cat "$SD_DISTILL_STORE/latest-summary.md"; fi
echo
echo "Prefect UI:   http://127.0.0.1:$PORT  (flow runs, artifacts: progress, tables, image grids)"
echo "Results:      $SD_DISTILL_STORE  (one content-addressed folder per stage)"
echo "Stop server and worker: make demo-stop"
