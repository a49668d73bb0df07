#!/usr/bin/env bash
# Issue #11's GPU measurements in one call, for a machine lent for minutes (the `device` tool's H200)
# that has torch but cannot reach a package registry. Prepare here, once:
#
#   PY=python3.12 bash benchmarks/gpu_wheelhouse.sh   # .whl/: what the GPU image lacks (pyenv here:
#                                                     # PY=/root/.pyenv/versions/3.12.1/bin/python3.12)
#   git clone https://github.com/linyq2117/CLIP-ES .ref/CLIP-ES && rm -rf .ref/CLIP-ES/.git   # optional
#
# then run this there with .whl and .ref carried (run(command="bash benchmarks/gpu_checks.sh",
# carry=[".whl", ".ref"], timeout_s=560)). Everything it prints also goes to $OUT/gpu_checks.md, and the
# benchmarks' numbers to $OUT/*.json. Each step has its own time limit, so one slow step cannot eat the
# lease; on another GPU machine, IMAGES=… and STEPS=… scale it. Try it here first, on the CPU:
#   DEVICE=cpu IMAGES=4 STEPS=2 CROP=64 ENCODER=resnet18 bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
IMAGES=${IMAGES:-512}
STEPS=${STEPS:-30}
DEVICE=${DEVICE:-cuda}
LOW=$([ "$DEVICE" = cuda ] && echo 16 || echo bf16)  # the low precision to measure: float16 on CUDA (auto's)
PY=${PY:-python3}
exec > >(tee "$OUT/gpu_checks.md") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore WANDB_MODE=disabled

step() { echo; echo "## $1"; echo; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
echo "CPUs: $(nproc); $($PY --version); $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

step "install (carried wheels, no index)"
if [ -d .whl ]; then
    $PY -m pip install --quiet --no-index --no-deps .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip as" | tail -5
fi
$PY -c "import lightning_clipes, open_clip, segmentation_models_pytorch, pydensecrf, jsonargparse; print('imports ok')" \
    || { echo "missing packages: run benchmarks/gpu_wheelhouse.sh here and carry .whl"; exit 1; }

step "labeller on $DEVICE against the CPU in float32 (64 toy-world images, the shipped toy CLIP)"
DEVICE=$DEVICE LOW=$LOW timeout 120 $PY - <<'EOF'
import os
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from toy_world_quality import class_maps, read_items  # the toy-world benchmark's own reading and batching
from lightning_clipes.components.clip_loader import SHIPPED, load_clip
from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.pseudo_mask import cams_to_label
from lightning_clipes.data.toy_captions import TOY_CLIP_NAME, TOY_TEMPLATE
from lightning_clipes.data.toy_scenes import TOY_BACKGROUNDS, TOY_CLASSES
from lightning_clipes.data.toy_world import ToyWorldSource

root = Path("outputs/gpu_checks_world/VOC2012")
ToyWorldSource(root, num_train=64, num_val=1, num_test=1).prepare()
_, images, labels, _ = read_items(root, "train", 64)

def labels_on(device, precision):
    clipes = CLIPES(load_clip(TOY_CLIP_NAME, SHIPPED), list(TOY_CLASSES), list(TOY_BACKGROUNDS), [TOY_TEMPLATE],
                    affinity_layers=2, precision=precision).to(device)
    return [cams_to_label(m.cams.float().cpu(), m.keys) for m in class_maps(clipes, images, labels)]

cpu = labels_on("cpu", "32")
device = os.environ["DEVICE"]
for precision in ("32", os.environ["LOW"]):
    other = labels_on(device, precision)
    shares = [float((a == b).float().mean()) for a, b in zip(cpu, other)]
    print(f"{device} {precision} against cpu 32: label agreement worst {100 * min(shares):.2f} %, "
          f"mean {100 * sum(shares) / len(shares):.2f} %")
EOF

step "whole labelling pass (random ViT-B/16, VOC-sized images)"
REF=()
[ -d .ref/CLIP-ES ] && REF=(--reference .ref/CLIP-ES --reference-images 64)
timeout 300 $PY benchmarks/labelling_pass.py --device "$DEVICE" --images "$IMAGES" --precisions "32,$LOW" "${REF[@]}" \
    --json "$OUT/labelling_pass.json"

step "student training step against a bare smp loop"
timeout 150 $PY benchmarks/student_throughput.py --device "$DEVICE" --steps "$STEPS" --warmup "${WARMUP:-5}" \
    --crop "${CROP:-512}" --encoder "${ENCODER:-resnet101}" --precisions 32-true,bf16-mixed --channels-last both

echo; echo "done: $OUT"
