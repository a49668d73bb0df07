"""The pseudo-label store on disk: one file per image and kind, every write atomic.

Layout under ``root``::

    cams/<image_id>.npz         keys (K,) int64, cams (K, H, W) float16  [the reference's attn_highres]
    confidence/<image_id>.png   (H, W) 8-bit PNG, round(confidence * 255)
    masks/<image_id>.png        (H, W) uint8 class indices (argmax, not thresholded), VOC palette

A file is written to a temporary name in the same folder and renamed into place, so a killed job
never leaves a half-written file under a real name; the mask is written last, so an image counts
as done only when all its files are there. The confidence threshold of the confidence-guided loss
is applied when reading, so one store serves every threshold.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from lightning_clipes.data.voc_format import load_mask, save_mask_png

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PseudoLabelStore:
    """Read and write the pseudo-labels of one labeler configuration.

    Args:
        root: folder of the store, e.g. ``<default_root_dir>/pseudo_labels``.
        save_cams: also keep the float16 cams (large: K×H×W per image).
    """

    def __init__(self, root: PathLike, save_cams: bool = True) -> None:
        self.root = Path(root)
        self.save_cams = save_cams

    def cam_path(self, image_id: str) -> Path:
        return self.root / "cams" / f"{image_id}.npz"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def confidence_path(self, image_id: str) -> Path:
        return self.root / "confidence" / f"{image_id}.png"

    def is_done(self, image_id: str) -> bool:
        """All files of the image are in place (a rerun skips it)."""
        return (
            self.mask_path(image_id).is_file()
            and self.confidence_path(image_id).is_file()
            and (not self.save_cams or self.cam_path(image_id).is_file())
        )

    def is_readable(self, image_id: str) -> bool:
        """The image's mask and confidence decode (a damaged entry is recomputed)."""
        try:
            self.read(image_id)
            return True
        except (OSError, ValueError, SyntaxError):
            return False

    def write(self, image_id: str, keys: np.ndarray, cams: np.ndarray, mask: np.ndarray, confidence: np.ndarray) -> None:
        """Store one image: keys (K,) int, cams (K, H, W) float in [0, 1], mask (H, W) uint8, confidence (H, W) in [0, 1]."""
        if self.save_cams:
            buf = io.BytesIO()
            np.savez_compressed(buf, keys=np.asarray(keys, dtype=np.int64), cams=np.asarray(cams, dtype=np.float16))
            atomic_write_bytes(self.cam_path(image_id), buf.getvalue())
        conf8 = np.rint(np.clip(np.asarray(confidence, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(conf8).save(buf, format="PNG", optimize=False, compress_level=6)
        atomic_write_bytes(self.confidence_path(image_id), buf.getvalue())
        buf = io.BytesIO()
        save_mask_png(buf, np.asarray(mask, dtype=np.uint8))
        atomic_write_bytes(self.mask_path(image_id), buf.getvalue())

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask (H, W) uint8, confidence (H, W) float32 in [0, 1])."""
        mask = load_mask(self.mask_path(image_id))
        with Image.open(self.confidence_path(image_id)) as img:
            img.load()
            confidence = np.asarray(img, dtype=np.float32) / 255
        if confidence.shape != mask.shape:
            raise ValueError(f"Store entry {image_id}: mask {mask.shape} and confidence {confidence.shape} differ.")
        return mask, confidence

    def read_cams(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys (K,) int64, cams (K, H, W) float16)."""
        with np.load(self.cam_path(image_id)) as f:
            return f["keys"], f["cams"]

    def read_mask(self, image_id: str) -> np.ndarray:
        return load_mask(self.mask_path(image_id))

    def mirror_to(self, root: PathLike, image_ids: list[str]) -> "PseudoLabelStore":
        """Copy these images' masks and confidences to ``root`` (e.g. a node-local disk), atomically,
        skipping files already there with the same size; returns the store at ``root``."""
        local = PseudoLabelStore(root, save_cams=False)
        for image_id in image_ids:
            for src, dst in ((self.confidence_path(image_id), local.confidence_path(image_id)),
                             (self.mask_path(image_id), local.mask_path(image_id))):  # mask last, as in write()
                if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
                    atomic_write_bytes(dst, src.read_bytes())
        return local

    def write_meta(self, meta: dict) -> None:
        """Record how the labels were made (``meta.json``), for people and for reuse checks."""
        atomic_write_bytes(self.root / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
