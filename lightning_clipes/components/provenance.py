"""What a weights file was trained with, and whether a new run wrote the same tensors.

The package ships weights it trained itself (the toy CLIP, the toy student encoder) and claims that
their configs reproduce them. A run is deterministic for one machine and install, but float32 training
is not bit-exact across them: another CPU instruction set sends the matmuls (MKL) and ATen's vectorised
kernels down other code paths whose last bits differ, and a few hundred steps grow those bits into
another draw of the recipe (measured: docs/toy_clip_history.md, 2026-12-03). So an export records the
software and the processor it ran on (:func:`training_environment`), and before it replaces a file it says
whether its tensors equal the old ones and, if not, what differs in that record
(:func:`replacement_report`; both through :func:`write_weights`): re-running ``clipes fit -c
experiments/toy_clip.yaml`` tells at once whether the shipped file was reproduced, and if not, why.
"""
from __future__ import annotations

import io
import platform
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

import torch

from lightning_clipes.data.store import atomic_write_bytes

# the distributions whose arithmetic or random draws reach the weights (data rendering included)
TRAINING_SOFTWARE = ("torch", "open_clip_torch", "lightning", "numpy", "pillow", "timm", "segmentation_models_pytorch")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_environment(device: Optional[torch.device] = None) -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1", ..., "cpu": "AMD EPYC", "cpu_capability": "AVX2"}`` of this
    install and machine (a package that is absent is left out); ``"gpu"`` too when ``device`` is a CUDA one."""
    record = {"python": platform.python_version()}
    for name in TRAINING_SOFTWARE:
        try:
            record[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    record["cpu"] = cpu_name()
    record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the kernels ATen dispatches to
    if device is not None and torch.device(device).type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def _tensors(mapping: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint dict, keyed by its path ``a/b/c``; a top-level
    ``state_dict`` adds nothing to the path (a bare state dict and one wrapped in it compare equal)."""
    found = {}
    for key, value in mapping.items():
        if isinstance(value, torch.Tensor):
            found[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            found.update(_tensors(value, "" if (not prefix and key == "state_dict") else f"{prefix}{key}/"))
    return found


def tensor_differences(old: Mapping, new: Mapping) -> tuple[list[str], int]:
    """The tensor paths whose shape, dtype or values differ between two checkpoint dicts (or that one
    of them lacks), and how many tensor paths the two hold together."""
    a, b = _tensors(old), _tensors(new)
    keys = sorted(set(a) | set(b))
    differ = [k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return differ, len(keys)


def replacement_report(path: Path, new: Mapping, new_record: Optional[Mapping[str, str]] = None) -> str:
    """One sentence on what writing ``new`` over ``path`` changes: ``"new file"``, ``"the same tensors
    as the file it replaces"``, or how many tensors differ and what differs in the two files' records of
    their training (``"trained_with"``, :func:`training_environment`)."""
    path = Path(path)
    if not path.exists():
        return "new file"
    try:
        old = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file is simply replaced
        return f"replaces an unreadable file ({type(err).__name__})"
    if not isinstance(old, Mapping):
        return f"replaces a file holding a {type(old).__name__}"
    differ, total = tensor_differences(old, new)
    if not differ:
        return "the same tensors as the file it replaces"
    text = f"{len(differ)} of {total} tensors differ from the file it replaces"
    old_record = old.get("trained_with")
    if not isinstance(old_record, Mapping):
        return text + " (that file does not record the software and processor it was trained on)"
    new_record = dict(new_record or training_environment())
    changed = [f"{k} {old_record.get(k, 'absent')} -> {new_record.get(k, 'absent')}"
               for k in sorted(set(old_record) | set(new_record)) if old_record.get(k) != new_record.get(k)]
    if changed:
        return text + "; its training record differs: " + ", ".join(changed)
    return text + ", trained on the same software and processor"


def write_weights(path: str | Path, ckpt: dict, device: Optional[torch.device] = None) -> str:
    """Save ``ckpt`` (a dict of tensors) at ``path`` atomically, with its training record added under
    ``"trained_with"``; returns ``"weights written to PATH (REPORT)"``, :func:`replacement_report`'s."""
    path = Path(path).expanduser()
    ckpt = {**ckpt, "trained_with": training_environment(device)}
    report = replacement_report(path, ckpt, ckpt["trained_with"])
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return f"weights written to {path} ({report})"
