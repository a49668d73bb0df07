#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry (the `device` tool's H100/H200 has
# torch, lightning, torchmetrics, timm and torchvision but not open_clip, smp, jsonargparse, wandb …).
# Run it here, where the registry is reachable; it writes .whl/ (ignored by git), about 30 MB:
#
#   bash benchmarks/gpu_wheelhouse.sh            # for Python 3.12, the GPU image's
#   PY=python3.11 bash benchmarks/gpu_wheelhouse.sh
#
# It resolves setup.cfg's install_requires for that Python on this x86-64 Linux machine, keeps the
# distributions the GPU image lacks (HAVE below, read off the image on 2026-11-17), downloads their
# wheels and builds the ones published as source only (pydensecrf2). benchmarks/gpu_checks.sh
# installs them there with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
HAVE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

"$PY" -c "import sys; assert sys.version_info[:2] >= (3, 9)" || { echo "$PY not found: set PY to a Python 3.9+" >&2; exit 1; }
rm -rf .whl && mkdir -p .whl
reqs=$("$PY" - <<'EOF'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
print(" ".join(r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()))
print("ttach")  # for the reference CLIP-ES beside ours (benchmarks/reference_runner.py)
EOF
)
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --dry-run --ignore-installed --report .whl/report.json $reqs
"$PY" - "$HAVE" <<'EOF' > .whl/needed.txt
import json, re, sys
have = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1].split()}
for item in json.load(open(".whl/report.json"))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if name not in have and not name.startswith("nvidia-"):  # CUDA's libraries come with the image's torch
        print(f"{meta['name']}=={meta['version']}")
EOF
echo "needed on the GPU image: $(tr '\n' ' ' < .whl/needed.txt)"
# wheels where published, else built here for this Python (pydensecrf2 ships a source archive only)
"$PY" -m pip wheel --quiet --no-deps --wheel-dir .whl -r .whl/needed.txt
rm -f .whl/report.json
du -sh .whl
