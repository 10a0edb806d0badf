#!/usr/bin/env bash
# The GPU verification (issue 26): one script, under 10 minutes on one GPU, run as `make gpu-check` on a machine
# with an NVIDIA GPU and a CUDA build of PyTorch. Its output is what README.md's "Training on a GPU" quotes, with
# the GPU named. It never runs in `make test` or CI.
#   1. the tests marked gpu (tests/test_device.py; TensorRT's where it is installed)
#   2. the digits pipeline end to end with --device cuda
#   3. torchrun with one process per GPU (NCCL; with one GPU a single process, said so)
#   4. one CIFAR-10 distill epoch on the GPU (images/s, beside the CPU's in BENCHMARKS.md), if ../shared has it
set -uo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/gpu-check}
SHARED=${SHARED:-../shared}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
elapsed() { echo "exit $1, $(( $(date +%s) - $2 )) s"; }

step "GPU and PyTorch"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$BIN/python" -c "import torch; assert torch.cuda.is_available(), 'PyTorch sees no CUDA GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0), \
'capability', torch.cuda.get_device_capability(0), '| GPUs:', torch.cuda.device_count())" || exit 1

summary() {  # per stage: status, device, top-1, and the training epochs' images/s and autocast
    "$BIN/python" - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for e in json.loads((run / "manifest.json").read_text())["stages"]:
    m = run / e["name"] / "metrics.json"
    rec = json.loads(m.read_text()) if m.exists() else {}
    rows = (rec.get("records") or {}).get("history") or []
    speed = ", ".join(f"{r['images_per_s']:.0f} img/s ({r['autocast']})" for r in rows)
    top1 = (rec.get("accuracy") or {}).get("top1")
    print(f"  {e['name']:8s} {e['status']:8s} {(e.get('torch_device') or {}).get('device', '-'):7s} "
          f"top-1 {top1 if top1 is None else f'{top1:.4f}'}  launch {e.get('launch', {}).get('backend')}  {speed}")
PY
}

step "1. tests marked gpu"
start=$(date +%s)
"$BIN/python" -m pytest -q -rs -m gpu -p no:cacheprovider 2>&1 | tail -n 15
elapsed "${PIPESTATUS[0]}" "$start"

step "2. digits pipeline, --device cuda, end to end (TARGET=jetson)"
start=$(date +%s)
"$BIN/edgepipe" run --config digits --target jetson --run "$OUT/digits-cuda" --device cuda --no-report \
    >"$OUT/digits-cuda.log" 2>&1
rc=$?; elapsed "$rc" "$start"; [ "$rc" = 0 ] && summary "$OUT/digits-cuda" || tail -n 5 "$OUT/digits-cuda.log"

step "3. torchrun, one process per GPU"
n=$("$BIN/python" -c "import torch; print(torch.cuda.device_count())")
[ "$n" = 1 ] && echo "  one GPU: torchrun runs one process (a group of one is a single process in edgepipe)"
start=$(date +%s)
"$BIN/torchrun" --standalone --nproc-per-node="$n" -m edgepipe run --config digits --target jetson \
    --run-dir "$OUT/digits-torchrun" --device cuda --no-report >"$OUT/digits-torchrun.log" 2>&1
rc=$?; elapsed "$rc" "$start"; [ "$rc" = 0 ] && summary "$OUT/digits-torchrun" || tail -n 5 "$OUT/digits-torchrun.log"

step "4. one CIFAR-10 distill epoch on the GPU"
if [ -d "$SHARED/datasets/cifar10" ] && [ -f "$SHARED/teachers/resnet56_cifar10.pt2" ]; then
    "$BIN/python" - "$SHARED" "$OUT/cifar10-1epoch.yaml" <<'PY'
import sys, yaml
from pathlib import Path
shared, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
cfg = yaml.safe_load(Path("configs/cifar10.yaml").read_text())
cfg["data"]["path"] = str(shared / "datasets/cifar10")
cfg["teacher"]["model"]["program"] = str(shared / "teachers/resnet56_cifar10.pt2")
cfg["soft_targets"] = {"runtime": "torch", "cache": False}  # the teacher on the GPU too
cfg["distill"]["optim"]["epochs"] = 1
out.write_text(yaml.safe_dump(cfg, sort_keys=False))
PY
    start=$(date +%s)
    "$BIN/edgepipe" teacher --config "$OUT/cifar10-1epoch.yaml" --target jetson --run "$OUT/cifar10" --device cuda \
        >"$OUT/cifar10.log" 2>&1 &&
    "$BIN/edgepipe" distill --run "$OUT/cifar10" --device cuda >>"$OUT/cifar10.log" 2>&1
    rc=$?; elapsed "$rc" "$start"; [ "$rc" = 0 ] && summary "$OUT/cifar10" || tail -n 5 "$OUT/cifar10.log"
    echo "  CPU figure to set beside it: BENCHMARKS.md (the distill rows' images/s, with their CPU)"
else
    echo "  skipped: $SHARED/datasets/cifar10 or the shipped teacher is not here"
fi
