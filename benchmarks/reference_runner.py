"""Run the reference CLIP-ES (linyq2117/CLIP-ES) beside ours on the same images and weights.

The reference is never part of this repository: bring it yourself (``git clone
https://github.com/linyq2117/CLIP-ES``) and install what its scripts import (``pip install lxml ftfy
regex ttach opencv-python-headless``). Its ``generate_cams_voc12.py`` runs unchanged except on a machine
without CUDA, where the one line that picks ``cuda:<n>`` is replaced by ``cpu`` at run time (and, where
setuptools no longer ships ``pkg_resources``, a stand-in gives ``clip.py`` the ``packaging`` it imports).

Shared by ``reference_parity.py`` (are the maps the same?) and ``labelling_pass.py`` (which is faster?).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lightning_clipes.data.synthetic import write_synthetic_voc

_DEVICE_LINE = 'device_id = "cuda:{}".format(process_id % n_gpus)'


def check_reference(reference: Path) -> Path:
    """The reference checkout, or SystemExit with what to do."""
    reference = Path(reference).expanduser().resolve()
    script = reference / "generate_cams_voc12.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --reference must be a checkout of https://github.com/linyq2117/CLIP-ES.")
    if _DEVICE_LINE not in script.read_text():
        raise SystemExit(f"{script} has no line {_DEVICE_LINE!r}; this runner knows the reference at commit 3893f81.")
    return reference


def write_images(root: Path, sizes: Sequence[tuple[int, int]], seed: int = 0) -> tuple[Path, list[str]]:
    """A VOC-layout folder with one image per (width, height), 1-3 VOC objects each; returns (root, ids)."""
    classes = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow")
    root = write_synthetic_voc(root, num_train=len(sizes), num_val=0, classes=classes, image_sizes=sizes,
                               max_objects=3, seed=seed)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    return root, ids


def write_random_openai_weights(path: Path, model_name: str = "ViT-B-16", seed: int = 0, perturb: float = 0.0) -> Path:
    """Random CLIP weights with OpenAI's key names (the format of ``ViT-B-16.pt``), fp16 like OpenAI's file.

    ``perturb`` adds Gaussian noise of that scale to biases and LayerNorm weights (open_clip initialises
    them to 0 and 1, which hides some mistakes).
    """
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True)
    state = model.state_dict()
    if perturb:
        for name, tensor in state.items():
            if tensor.is_floating_point() and (name.endswith(".bias") or "ln_" in name):
                tensor.add_(perturb * torch.randn_like(tensor))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def run_reference(reference: Path, voc_root: Path, ids: Sequence[str], weights: Path, out_dir: Path,
                  python: str = sys.executable) -> float:
    """Run ``generate_cams_voc12.py`` in its own process on ``ids``; returns the process's wall seconds.

    Writes ``out_dir/<id>.npy`` (a pickled dict with ``keys`` and ``attn_highres`` float16 (K, H, W)).
    """
    reference = check_reference(reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = out_dir / "split.txt"
    split.write_text("".join(f"{i}\n" for i in ids))
    device = "None" if torch.cuda.is_available() else '"cpu"'
    launcher = textwrap.dedent(f"""
        import sys, types
        try:
            import pkg_resources  # noqa: F401  (setuptools >= 81 has none; clip.py only wants its packaging)
        except ImportError:
            import packaging.version
            sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
        sys.argv = ["generate_cams_voc12.py", "--img_root", {str(voc_root / 'JPEGImages')!r},
                    "--split_file", {str(split)!r}, "--cam_out_dir", {str(out_dir)!r}, "--model", {str(weights)!r}]
        source, device = open("generate_cams_voc12.py").read(), {device}
        if device is not None:
            source = source.replace({_DEVICE_LINE!r}, "device_id = " + repr(device))
        exec(compile(source, "generate_cams_voc12.py", "exec"), {{"__name__": "__main__"}})
    """)
    env = dict(os.environ, PYTHONPATH=str(reference))
    start = time.perf_counter()
    done = subprocess.run([python, "-c", launcher], cwd=reference, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"The reference failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def read_reference(out_dir: Path, image_id: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(keys (K,) int, attn_highres (K, H, W) float32) the reference wrote for ``image_id``, or None."""
    path = out_dir / f"{image_id}.npy"
    if not path.is_file():
        return None
    data = np.load(path, allow_pickle=True).item()
    return np.asarray(data["keys"]), np.asarray(data["attn_highres"], dtype=np.float32)
