"""What a pseudo-label store is keyed by: everything that makes the masks, and nothing else.

* the labeler's resolved settings (the words themselves, not aliases such as ``voc``),
* the CLIP weights (a digest of the tensors, not the file's path),
* the code that computes the labels (a digest of its source files) and the store's format,
* for the in-job store, the data source (its class and resolved paths).

The data's content is checked per image instead (see :class:`~lightning_clipes.data.store.EntryRecord`):
an entry is reused only when the image file (pixel size, byte size, modification time) and its
labels are those it was made from. So a rewritten image is labelled again while the rest of the
store is kept, and a store made for ``train_aug`` also serves ``train``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from lightning_clipes.data.store import STORE_FORMAT

_PACKAGE = Path(__file__).resolve().parents[1]
# the source files whose code decides the masks
LABELLING_SOURCES = (
    "components/clip_loader.py", "components/prompts.py", "components/vit_tokens.py", "components/gradcam.py",
    "components/affinity.py", "components/clipes.py", "components/pseudo_mask.py", "components/crf.py",
    "components/labelling.py", "data/store.py",
)


def code_digest() -> str:
    """16 hex digits over the labelling code's source files (any change there relabels)."""
    h = hashlib.sha256()
    for name in LABELLING_SOURCES:
        h.update(name.encode())
        h.update((_PACKAGE / name).read_bytes())
    return h.hexdigest()[:16]


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def digest(obj: Any) -> str:
    """16 hex digits over a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def labeler_identity(description: Mapping[str, Any], weights: str) -> dict:
    """What decides the labels of one image: settings (minus where the weights file lies), weights, code, format."""
    settings = {k: v for k, v in description.items() if k != "pretrained"}
    return {"settings": settings, "weights_sha256": weights, "code": code_digest(), "store_format": STORE_FORMAT}


def source_identity(source: Any) -> dict:
    """The data source's class and settings (paths resolved), so two datasets never share a store."""
    settings = {}
    for key, value in vars(source).items():
        if key.startswith("_") or key in ("class_names", "prompt_names"):
            continue
        settings[key] = str(Path(value).resolve()) if isinstance(value, Path) else str(value)
    return {"class": type(source).__name__, **settings}
