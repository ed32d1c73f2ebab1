#!/usr/bin/env bash
# The GPU figures of issues 6 (network) and 7 (monocular) in one device command (docs/GPU.md):
#
#   bash bench/gpu.sh           full run, fits one 600 s device command (budget GPU_BUDGET_S, default 540 s;
#                               GPU_MONO_MAX_S=90,35,35 shortens the monocular modes' time boxes)
#   bash bench/gpu.sh --quick   every CUDA branch for a few frames (~2-3 min): a cheap first call
#
# Installs the carried wheels (.whl, made by tools/device_wheels.sh) into /tmp/site when present,
# prints the GPU and the torch/CUDA versions, checks the imports, then runs, each with its output
# tee'd to $OUT/<name>.log (OUT defaults to ./bench_out):
#   network        bench/network.py: ViT-L/512 DPT engine vs naive per-pair, online step, memory (#6)
#   monocular      bench/monocular.py: the whole monocular step through the product (#7 target line)
#   monocular_host bench/monocular_host.py --device cuda: host-side cost of the step (oracle network)
#   alignment      bench/alignment.py --device cuda --size 512x384: online step vs 300 Adam iterations
# Each bench gets a timeout from what is left of the budget, so a slow or hung one still leaves
# the later ones their time; $OUT/summary.log collects the target lines and exit codes.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  '') ;;
  *) echo "usage: bash bench/gpu.sh [--quick]" >&2; exit 2 ;;
esac
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-540}   # seconds for everything below (the device command's limit is 600 s)
MONO_MAX=${GPU_MONO_MAX_S:-130,50,50}  # full mode: bench/monocular.py's time box per mode (flow,attention,both)
T0=$SECONDS
SUMMARY="$OUT/summary.log"
: >"$SUMMARY"

if compgen -G '.whl/*.whl' >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels (.whl) failed" | tee -a "$SUMMARY"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl folder: bench/alignment.py needs evo (run tools/device_wheels.sh here and carry .whl)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "== $(date -u '+%F %T UTC'), mode $([ $QUICK = 1 ] && echo quick || echo full), budget ${BUDGET}s"
  nvidia-smi -L 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  $PY - <<'EOF'
import importlib, os, sys
import torch
cuda = torch.cuda.is_available()
print(f'python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'cuDNN {torch.backends.cudnn.version()}, cuda available {cuda}', end='')
if cuda:
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f', {p.name}, {p.multi_processor_count} SMs, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), '
          f'bf16 {torch.cuda.is_bf16_supported()}', end='')
print(f'; {os.cpu_count()} CPUs')
mods = ['evo.core.trajectory', 'evo.core.sync', 'evo.core.metrics', 'evo.core.units', 'numpy', 'scipy.stats', 'cv2',
        'einops', 'yaml', 'PIL.Image', 'dynrecon_ros.network', 'dynrecon_ros.reconstructor', 'dynrecon_ros.monocular',
        'dynrecon_ros.pointmap_alignment', 'dynrecon_ros.predictors.dust3r', 'dynrecon_ros.data.synthetic',
        'dynrecon_ros.evaluation', 'dynrecon_ros.memory']
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report all at once
        bad.append(f'{m}: {type(e).__name__}: {e}')
vers = {m: getattr(sys.modules.get(m), '__version__', '?') for m in ('numpy', 'scipy', 'cv2', 'evo')}
print('versions:', ', '.join(f'{k} {v}' for k, v in vers.items()), '| dynrecon_ros from',
      os.path.dirname(sys.modules['dynrecon_ros'].__file__) if 'dynrecon_ros' in sys.modules else '?')
print('import check:', 'OK' if not bad else 'FAILED: ' + '; '.join(bad))
if not cuda:
    print('WARNING: CUDA not available: the benches fall back to CPU or skip their CUDA parts')
EOF
} 2>&1 | tee "$OUT/env.log"
grep -q 'import check: OK' "$OUT/env.log" || echo "import check failed (see env.log); the benches that need those modules will fail" | tee -a "$SUMMARY"

# run NAME CAP_SECONDS CMD...: timeout = min(CAP, what is left of the budget); output to $OUT/NAME.log
run() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    echo "== $name SKIPPED: ${left}s of the budget left" | tee -a "$SUMMARY"
    return
  fi
  local s=$SECONDS
  echo "== $name (timeout ${t}s): $*" | tee "$OUT/$name.log"
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local why=''
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=' (TIMED OUT)'
  echo | tee -a "$OUT/$name.log"  # (progress lines end without a newline)
  echo "== $name rc=$rc$why in $((SECONDS - s))s (elapsed $((SECONDS - T0))s)" | tee -a "$OUT/$name.log" "$SUMMARY"
  grep -hE 'TARGET|speed-up|online step \(1|steady state \(frames|^(cuda|cpu) +closed_form|Traceback|Error' \
    "$OUT/$name.log" | grep -v '^==' | sed "s/^/  [$name] /" >>"$SUMMARY"
}

if [ $QUICK = 1 ]; then
  run network 120 $PY bench/network.py --configs '' --gpu-reps 1
  # attention_min_contrast=0: the random weights' attention masks are then not empty, so Easi3R's second
  # pass (cross_attn_zero, explicit attention under autocast) runs too
  # (align_iterations 30: the first window's Adam schedule shortened; bench/alignment.py runs the full 300)
  run monocular 200 $PY bench/monocular.py --frames 12 --warmup 9 --every 4 --modes flow,attention,both \
    --set segmentation.attention_min_contrast=0 backend.align_iterations=30
  run monocular_host 90 $PY bench/monocular_host.py --device cuda --frames 12 --warmup 9
  run alignment 120 $PY bench/alignment.py --device cuda --size 512x384 --windows 8 --steps 1
else
  run network 120 $PY bench/network.py --configs '' --gpu-reps 5
  # up to 200 frames per mode, time-boxed (flow, the product default, longest: its memory slope is taken over
  # the frames after the 64-frame input cache is full)
  run monocular 300 $PY bench/monocular.py --frames 200 --every 20 --modes flow,attention,both \
    --max-seconds "$MONO_MAX"
  run monocular_host 60 $PY bench/monocular_host.py --device cuda --frames 20 --warmup 9 --sweeps 5
  run alignment 150 $PY bench/alignment.py --device cuda --size 512x384 --windows 8 16 32 --steps 3
fi
echo "== done in $((SECONDS - T0))s; logs in $OUT" | tee -a "$SUMMARY"
cat "$SUMMARY"
