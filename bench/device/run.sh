#!/usr/bin/env bash
# W7 (PyTorch digits) on the GPU machine, from the repo root, with `.whl` and `.gpu` carried:
#
#   run(command="bash bench/device/run.sh", carry=[".whl", ".gpu"], timeout_s=480)
#
# Installs the carried wheels into $SITE (that machine has no network and no ray, celery,
# fastapi, ...), puts .gpu/bin (redis-server) on PATH, checks imports first (seconds), then
# runs the same bench command as on the CPU:  python -m bench run --workload W7
# and copies the result, the report and the logs into $OUT.
#
# Overridable for a dry run elsewhere: PY (python3), SITE (/tmp/site), BENCH_ARGS
# ("--workload W7"), BENCH_TIMEOUT (420 s), EXTRA_PYTHONPATH (appended), NEED_TORCH (1),
# NEED_GPU (1: stop when torch or Ray sees no GPU).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
: "${OUT:?OUT must name the folder whose files come back}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1

PY="${PY:-python3}"
SITE="${SITE:-/tmp/site}"
BENCH_ARGS="${BENCH_ARGS:---workload W7}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
NEED_TORCH="${NEED_TORCH:-1}"
NEED_GPU="${NEED_GPU:-1}"
WORK="${WORK:-/tmp/synapse-gpu}"
T0=$(date +%s)
export PS4='+ [$(date +%H:%M:%S) $(( $(date +%s) - T0 ))s] '
die() { echo "=== FAILED: $1 ==="; exit "${2:-2}"; }
set -x

# --- 0. what came over --------------------------------------------------------------------
uname -a
ls .whl | wc -l
du -sh .whl .gpu
"$PY" -VV

# --- 1. wheels ------------------------------------------------------------------------------
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || die "pip install of .whl/*.whl into $SITE failed" 3
export PYTHONPATH="$SITE:$ROOT${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export PATH="$ROOT/.gpu/bin:$SITE/bin:$PATH"
chmod +x .gpu/bin/redis-server 2>/dev/null || true

# --- 2. imports, Redis, the GPU as torch and Ray see it (seconds; stops before the bench) ---
"$PY" - <<'EOF' || die "imports: the carried wheels do not work here (see the traceback above)" 4
import importlib, sys
bad = []
for name in ("ray", "ray.serve", "celery", "kombu", "fastapi", "uvicorn", "structlog", "redis",
             "pydantic", "pydantic_settings", "jwt", "cryptography.fernet", "grpc",
             "grpc_reflection.v1alpha.reflection", "google.protobuf", "opentelemetry.sdk",
             "ray.serve._private.proxy", "sklearn", "numpy", "httpx", "yaml", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"ok   {name:38s} {getattr(m, '__version__', '')}  {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        bad.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")
for name in ("worker.cli", "serve_runtime.deploy", "devtools.demo_env", "local_backend.server",
             "bench.harness"):
    try:
        importlib.import_module(name)
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001
        bad.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")
sys.exit(1 if bad else 0)
EOF
command -v redis-server
redis-server --version || die "redis-server (.gpu/bin) does not run here" 5
"$PY" -c "
from devtools.redis_server import RedisServer
r = RedisServer().start(); print('redis answered at', r.url); r.close()
" || die "a throwaway redis-server did not start" 5

nvidia-smi || echo "(no nvidia-smi)"
"$PY" - <<EOF || die "no GPU for W7 as torch or Ray sees it (NEED_GPU=$NEED_GPU)" 6
import sys, time
t = time.time()
need_torch, need_gpu = "$NEED_TORCH" == "1", "$NEED_GPU" == "1"
try:
    import torch
except ImportError as e:
    print("torch: not importable:", e)
    sys.exit(1 if need_torch else 0)
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (import {time.time() - t:.1f}s), "
      f"torch.cuda.is_available() = {cuda}")
if cuda:
    print("device:", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
from ray._private.accelerators import NvidiaGPUAcceleratorManager as M
n = M.get_current_node_num_accelerators()
print("Ray sees GPUs:", n, M.get_current_node_accelerator_type())
if need_gpu and not (cuda and n >= 1):
    print("W7 would ask Ray for num_gpus=1 only if torch sees CUDA, and Ray must count a GPU "
          "(NVML, libnvidia-ml.so.1) or the replica never schedules")
    sys.exit(1)
EOF

# --- 3. the bench: the same command as on the CPU -------------------------------------------
export RAY_TMPDIR=/tmp/rt-w7     # a private Ray temp dir (short: Ray's socket paths)
rm -rf "$RAY_TMPDIR" "$WORK"; mkdir -p "$RAY_TMPDIR" "$WORK/results" "$WORK/work"
unset RAY_ADDRESS
# GPU use while the bench runs: utilisation and memory each second, compute processes each 2 s
SAMPLER=""
if command -v nvidia-smi >/dev/null; then
    ( while :; do
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader \
            | sed 's/^/  app: /'
        sleep 2
      done ) > "$OUT/gpu_samples.txt" 2>&1 &
    SAMPLER=$!
fi
# shellcheck disable=SC2086
timeout -k 20 "$BENCH_TIMEOUT" "$PY" -m bench run $BENCH_ARGS \
    --results-dir "$WORK/results" --workdir "$WORK/work"
RC=$?
[ -n "$SAMPLER" ] && kill "$SAMPLER"
echo "=== bench exit status $RC (124: timed out after ${BENCH_TIMEOUT}s) ==="

# --- 4. what comes back (<= 8 files, 16 MiB each) -------------------------------------------
set +x
cp "$WORK"/results/W*.json "$OUT"/ 2>/dev/null
cp "$WORK"/results/REPORT.md "$OUT"/ 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.tar.gz' --exclude='*.pt' work 2>/dev/null
tar -czf "$OUT/ray_logs.tar.gz" -C "$RAY_TMPDIR" --exclude='*.so' --exclude='runtime_resources' \
    --exclude='sockets' . 2>/dev/null
for f in "$OUT"/*; do
    if [ "$(stat -c %s "$f")" -gt 16000000 ]; then
        echo "$f is over 16 MB: cut to its last 15 MB"; tail -c 15000000 "$f" > "$f.cut" && mv "$f.cut" "$f"
    fi
done
ls -la "$OUT"
"$PY" - "$WORK/results" <<'EOF'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("W*.json")):
    r = json.loads(p.read_text())
    print(f"{r['workload']}: {r['jobs']} jobs, wall {r.get('wall_s')} s, stack {r.get('stack')}")
    if "error" in r:
        print("ERROR:", r["error"]); print(r.get("traceback", "")[-2500:])
    for s in r.get("systems", []):
        keep = {k: s.get(k) for k in ("label", "throughput", "mean_batch", "device", "failed",
                                      "lost", "cpu_ms_per_job", "rest_ms_per_job")}
        print("  ", json.dumps(keep))
    for t in r.get("targets", []):
        print("   target:", t.get("name"), "->", t.get("value"), "met" if t.get("met") else "NOT met")
EOF
echo "=== done in $(( $(date +%s) - T0 )) s, bench exit $RC ==="
exit "$RC"
