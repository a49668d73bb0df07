"""The pseudo-label store on disk: one file per image and kind, every write atomic.

Layout under ``root`` (one labeler configuration; see :mod:`lightning_clipes.data.store_key`)::

    meta.json                   how the labels were made (settings, weights, code, data source)
    masks/<image_id>.png        (H, W) uint8 class indices (argmax, not thresholded), VOC palette; carries
                                the entry's record (image size and file stamp, labels) in a text chunk
    confidence/<image_id>.png   (H, W) 16-bit PNG, floor(confidence * 60000)
    cams/<image_id>.npz         keys (K,) int64, cams (K, H, W) float16  [optional; the reference's attn_highres]
    claims/<image_id>.claim     who is labelling the image right now (jobs sharing a store label it once)
    failed/<image_id>.json      why the image could not be labelled, and in which pass
    passes/                     one log per labelling pass and rank

Files are written to a temporary name in the same folder (mode from the umask, so a group-readable
store stays group-readable) and renamed into place; the mask is written last, so an image counts as
done only when all its files are there. An entry is reused only when its record matches the image
it is asked for (same pixel size, file size, modification time and labels): a rewritten image is
labelled again. The confidence threshold of the confidence-guided loss is applied when reading, so
one store serves every threshold: confidence is stored as floor(c · 60000), exact for float32 c, so
every threshold with at most four decimals (0.95, 0.9, 0.99 …) keeps exactly the pixels whose
confidence is at or above it (compared in exact arithmetic: :func:`decode_confidence` returns float64).
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, PngImagePlugin

from lightning_clipes.data.claims import ClaimOwner
from lightning_clipes.data.voc_format import load_mask, save_mask_png

PathLike = Union[str, os.PathLike]
STORE_FORMAT = 2  # 2: 16-bit confidence, entry records, claims (1: 8-bit confidence)
CONFIDENCE_SCALE = 60000  # a multiple of 10^4 below 2^16: four-decimal thresholds are exact
RECORD_KEY = "clipes-entry"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``; the file's mode follows
    the umask (as ``open`` would), and a full disk is reported with the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _with_path(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600 whatever the umask
            f.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _with_path(err, path) from err
        raise


def _with_path(err: OSError, path: Path) -> OSError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, f"No space left on device (or quota exceeded) while writing {path}: free some space "
                                  f"there or point the store elsewhere (--data.store_dir / --model.output_dir)")
    if err.filename is None:
        return OSError(err.errno, f"{err.strerror or err} while writing {path}")
    return err


@dataclass(frozen=True)
class EntryRecord:
    """What an entry was made from: the image's pixel size (H, W), its file's size in bytes and
    modification time (ns), and the image-level labels in order."""

    size: tuple[int, int]
    file: tuple[int, int]
    labels: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "EntryRecord":
        data = json.loads(text)
        return cls(tuple(data["size"]), tuple(data["file"]), tuple(data["labels"]))


def image_record(path: PathLike, labels) -> EntryRecord:
    """The :class:`EntryRecord` of an image file as it is now (reads only the file's header)."""
    stat = os.stat(path)
    with Image.open(path) as img:
        width, height = img.size
    return EntryRecord((height, width), (stat.st_size, stat.st_mtime_ns), tuple(int(c) for c in labels))


def encode_confidence(confidence: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) uint16 ``floor(c * 60000)`` (exact for float32 input)."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0, 1)
    return np.floor(c * CONFIDENCE_SCALE).astype(np.uint16)


def decode_confidence(q: np.ndarray) -> np.ndarray:
    """(H, W) uint16 -> (H, W) float64 (compare thresholds in float64: float32 would round 0.95 down)."""
    return np.asarray(q, dtype=np.float64) / CONFIDENCE_SCALE


class PseudoLabelStore:
    """Read and write the pseudo-labels of one labeler configuration.

    Args:
        root: folder of the store.
        save_cams: also keep the float16 cams (large: K×H×W per image).
    """

    def __init__(self, root: PathLike, save_cams: bool = False) -> None:
        self.root = Path(root)
        self.save_cams = save_cams

    # ------------------------------------------------------------------ paths
    def cam_path(self, image_id: str) -> Path:
        return self.root / "cams" / f"{image_id}.npz"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def confidence_path(self, image_id: str) -> Path:
        return self.root / "confidence" / f"{image_id}.png"

    def claim_path(self, image_id: str) -> Path:
        return self.root / "claims" / f"{image_id}.claim"

    def failure_path(self, image_id: str) -> Path:
        return self.root / "failed" / f"{image_id}.json"

    # ------------------------------------------------------------------ state
    def is_done(self, image_id: str) -> bool:
        """All files of the image are in place (says nothing about what they were made from)."""
        return (
            self.mask_path(image_id).is_file()
            and self.confidence_path(image_id).is_file()
            and (not self.save_cams or self.cam_path(image_id).is_file())
        )

    def read_record(self, image_id: str) -> Optional[EntryRecord]:
        """The record in the mask's header, or None when the mask is missing, damaged or has none.

        A mask that does not end with PNG's IEND chunk (a truncated file) counts as damaged.
        """
        path = self.mask_path(image_id)
        try:
            with open(path, "rb") as f:
                f.seek(-12, os.SEEK_END)
                if f.read(12)[4:8] != b"IEND":
                    return None
            with Image.open(path) as img:
                text = img.info.get(RECORD_KEY)
            return EntryRecord.from_json(text) if text else None
        except (OSError, ValueError, KeyError, SyntaxError, TypeError):
            return None

    def is_current(self, image_id: str, record: EntryRecord) -> bool:
        """The entry is complete and was made from exactly this image and these labels."""
        return self.is_done(image_id) and self.read_record(image_id) == record

    # ------------------------------------------------------------------ entries
    def write(self, image_id: str, record: EntryRecord, keys: np.ndarray, mask: np.ndarray, confidence: np.ndarray,
              cams: Optional[np.ndarray] = None) -> None:
        """Store one image: keys (K,) int, mask (H, W) uint8, confidence (H, W) in [0, 1], cams (K, H, W)
        float in [0, 1] (written when the store keeps cams)."""
        mask = np.asarray(mask, dtype=np.uint8)
        if tuple(mask.shape) != tuple(record.size) or np.shape(confidence) != mask.shape:
            raise ValueError(f"Entry {image_id}: mask {mask.shape} and confidence {np.shape(confidence)} must be the "
                             f"image's size {record.size}.")
        if self.save_cams:
            if cams is None:
                raise ValueError(f"Entry {image_id}: this store keeps cams; pass them to write().")
            buf = io.BytesIO()
            np.savez_compressed(buf, keys=np.asarray(keys, dtype=np.int64), cams=np.asarray(cams, dtype=np.float16))
            atomic_write_bytes(self.cam_path(image_id), buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(encode_confidence(confidence)).save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(self.confidence_path(image_id), buf.getvalue())
        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, record.to_json())
        buf = io.BytesIO()
        save_mask_png(buf, mask, pnginfo=info)
        atomic_write_bytes(self.mask_path(image_id), buf.getvalue())
        self.failure_path(image_id).unlink(missing_ok=True)

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask (H, W) uint8, confidence (H, W) float64 in [0, 1])."""
        mask = load_mask(self.mask_path(image_id))
        with Image.open(self.confidence_path(image_id)) as img:
            img.load()
            q = np.asarray(img)
        if q.dtype == np.uint8:  # a store of format 1
            raise ValueError(f"Store entry {image_id} has 8-bit confidence (an older store); delete {self.root}.")
        confidence = decode_confidence(q)
        if confidence.shape != mask.shape:
            raise ValueError(f"Store entry {image_id}: mask {mask.shape} and confidence {confidence.shape} differ.")
        return mask, confidence

    def read_cams(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys (K,) int64, cams (K, H, W) float16)."""
        with np.load(self.cam_path(image_id)) as f:
            return f["keys"], f["cams"]

    def read_mask(self, image_id: str) -> np.ndarray:
        return load_mask(self.mask_path(image_id))

    # ------------------------------------------------------------------ claims
    def claim(self, image_id: str, owner: ClaimOwner, timeout: float = 600.0) -> bool:
        """Take the image for ``owner``; False when someone alive holds it.

        A claim is stale (taken over) when its process is gone on this host (or is this process, in an
        earlier pass), when it belongs to an earlier run of the same SLURM job (requeued), or when it is
        older than ``timeout`` seconds.
        """
        path = self.claim_path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = owner.to_json().encode()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if not owner.is_stale_claim(path, timeout):
                return False
            atomic_write_bytes(path, text)  # two takers may both win: the image is then labelled twice, no harm
            return True
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        return True

    def release(self, image_id: str, owner: ClaimOwner) -> None:
        """Remove the claim if it is still ``owner``'s."""
        path = self.claim_path(image_id)
        try:
            if path.read_bytes() == owner.to_json().encode():
                path.unlink(missing_ok=True)
        except OSError:
            pass

    def record_failure(self, image_id: str, reason: str, pass_id: str) -> None:
        atomic_write_bytes(self.failure_path(image_id), json.dumps({"reason": reason, "pass": pass_id}).encode())

    def failure(self, image_id: str, pass_id: str) -> Optional[str]:
        """Why the image failed in pass ``pass_id`` (None if it did not fail there)."""
        try:
            data = json.loads(self.failure_path(image_id).read_text())
        except (OSError, ValueError):
            return None
        return data.get("reason") if data.get("pass") == pass_id else None

    def clean_temporary(self, older_than: float = 3600.0) -> int:
        """Delete temporary files that a killed writer left (older than ``older_than`` seconds); returns how many."""
        removed, now = 0, time.time()
        for sub in ("masks", "confidence", "cams", "preview", "claims", "failed"):
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for path in folder.glob(".*.tmp"):
                try:
                    if now - path.stat().st_mtime > older_than:
                        path.unlink()
                        removed += 1
                except OSError:
                    pass
        return removed

    # ------------------------------------------------------------------ store-wide
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

    def read_meta(self) -> Optional[dict]:
        try:
            return json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def write_meta(self, meta: dict) -> None:
        """Record how the labels were made (``meta.json``), for people and for reuse checks."""
        atomic_write_bytes(self.root / "meta.json", json.dumps(meta, indent=2, sort_keys=True, default=str).encode())


class StoreWriter:
    """Writes entries of a store on background threads (PNG and zlib encoding, the slow part of a write,
    release the GIL, so threads run them in parallel with the labeller and with each other).

    At most ``max_pending`` entries wait in memory; ``on_written(image_id)`` runs after an entry is in
    place (e.g. to release its claim). The first error of a write is raised by the next call.
    """

    def __init__(self, store: PseudoLabelStore, max_pending: int = 32, on_written=None,
                 threads: Optional[int] = None) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from threading import BoundedSemaphore

        if threads is None:  # a quarter of the CPUs, 2 to 8: ~6 ms of encoding per VOC image and thread
            threads = max(2, min(8, len(os.sched_getaffinity(0)) // 4 if hasattr(os, "sched_getaffinity") else 2))
        self.store, self.on_written = store, on_written
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="clipes-store")
        self._slots, self._slots_total = BoundedSemaphore(max_pending), max_pending
        self._errors: list[BaseException] = []

    def write(self, image_id: str, *args, **kwargs) -> None:
        """``store.write(image_id, *args, **kwargs)`` in the background."""
        self._raise()
        self._slots.acquire()
        self._pool.submit(self._write, image_id, args, kwargs)

    def _write(self, image_id: str, args, kwargs) -> None:
        try:
            self.store.write(image_id, *args, **kwargs)
            if self.on_written is not None:
                self.on_written(image_id)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            self._errors.append(err)
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait until every queued entry is written."""
        for _ in range(self._slots_total):
            self._slots.acquire()
        for _ in range(self._slots_total):
            self._slots.release()
        self._raise()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._raise()

    def _raise(self) -> None:
        if self._errors:
            raise self._errors.pop(0)
