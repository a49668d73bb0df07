"""The one labelling function of CLIP-ES: image + image-level labels -> cams (CAM, CAA) -> scores ->
optional dense CRF -> training mask + confidence (method §2-§5).

Every entry point runs it: ``clipes predict`` and ``clipes validate`` (:class:`~lightning_clipes.labeler.CLIPESLabeler`)
and the labelling pass inside ``fit`` (:mod:`lightning_clipes.data.pseudo_label_pass`).

    labeller = Labeller(clipes, bg_power=1.0, crf=CRFParams(), crf_workers=4)
    for batch in loader:                    # items: {"id", "image" (H, W, 3) uint8, "labels", ...}
        for done in labeller(batch):        # finished images (the CRF may finish a few batches later)
            write(done.item["id"], done.mask, done.confidence)
    for done in labeller.finish(): ...

The training mask is the CRF's argmax with confidence = max Q (the paper's, method §5) when the CRF
is on; without it, the CAA argmax with confidence = the winning share of the per-pixel sum of
[background, cams] — a confidence of ours, which the paper does not define.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_clipes.components.clipes import CLIPES, ClassMaps
from lightning_clipes.components.crf import CRFParams, dense_crf
from lightning_clipes.components.pseudo_mask import cams_to_label, class_ids, scores_with_background, share_confidence
from lightning_clipes.data.voc_format import ImageReadError

CONFIDENCE_NO_CRF = "share of [background, cams] (ours: the paper defines confidence only with the CRF)"
CONFIDENCE_CRF = "max Q of the dense CRF (the paper's)"


@dataclass
class LabelledImage:
    """One labelled image.

    item: the input item (``id``, ``image``, ``labels``, ``gt`` … as given).
    keys: (K,) int64, 0-based classes of the maps.
    mask: (H, W) uint8 training mask, 0 = background, 1 + class (the CRF's when the CRF is on).
    confidence: (H, W) float32 in [0, 1].
    stages: label maps (H, W) int64 per stage, ``cam`` (softmax-GradCAM), ``caa`` (+CAA) and with the CRF
        ``crf``, when the labeller keeps them (validation).
    cams: (K, H, W) float16 CAA cams on the host, when the labeller keeps them (store, previews).
    """

    item: dict
    keys: np.ndarray
    mask: np.ndarray
    confidence: np.ndarray
    stages: dict[str, torch.Tensor] = field(default_factory=dict)
    cams: Optional[np.ndarray] = None


def is_image_error(err: BaseException) -> bool:
    """Errors that belong to one image (unreadable, bad labels, too large for the device) and may be
    skipped; everything else (CUDA faults, bugs) stops the job instead of being counted as bad images."""
    return isinstance(err, (ImageReadError, ValueError, torch.OutOfMemoryError))


def crf_mask(image: np.ndarray, scores: np.ndarray, params: CRFParams, max_side: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense CRF -> (winner (H, W) int64 index into the score channels, confidence (H, W) float32 max Q).

    Images whose long side exceeds ``max_side`` are refined at that size and Q is resized back
    (bilinear), so a 5000×4000 photo does not take the CRF's memory for 20 million pixels.
    A top-level function of numpy arrays, so that it runs in a process pool.
    """
    height, width = image.shape[:2]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        small = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        scores = F.interpolate(torch.from_numpy(np.ascontiguousarray(scores))[None], size=size, mode="area")[0].numpy()
        q = torch.from_numpy(dense_crf(small, scores, params))[None]
        q = F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False)[0]
        confidence, winner = q.max(dim=0)
        return winner.numpy().astype(np.int64), confidence.numpy()
    q = dense_crf(image, scores, params)
    return q.argmax(axis=0).astype(np.int64), q.max(axis=0).astype(np.float32)


def available_cpus() -> int:
    """CPUs this process may use: SLURM's per-task count, else the affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Labeller:
    """The labelling function over batches of items, with the CRF inline or in worker processes.

    Args:
        clipes: the frozen CLIP-ES module, on the device where the maps are made.
        bg_power: background exponent t in ``(1 - max cam)^t``.
        crf: CRF settings, or None for no CRF.
        crf_workers: processes for the CRF (0 = in this process); results then come back a few
            batches later, at most ``4 × crf_workers`` images in flight.
        keep_stages: also return the CAM and CAA label maps (for validation).
        keep_cams: also return the CAA cams as float16 on the host (for the store and previews).
    The ``failed`` dict maps image id -> reason for the images that could not be labelled.
    """

    def __init__(self, clipes: CLIPES, bg_power: float = 1.0, crf: Optional[CRFParams] = None, crf_workers: int = 0,
                 keep_stages: bool = False, keep_cams: bool = False) -> None:
        self.clipes, self.bg_power, self.crf = clipes, bg_power, crf
        self.keep_stages, self.keep_cams = keep_stages, keep_cams
        self.failed: dict[str, str] = {}
        self._pool: Optional[ProcessPoolExecutor] = None
        if crf is not None and crf_workers > 0:
            self._pool = ProcessPoolExecutor(crf_workers, mp_context=multiprocessing.get_context("spawn"))
        self._max_pending = 4 * max(1, crf_workers)
        self._pending: deque[tuple[LabelledImage, Future]] = deque()

    @property
    def confidence_definition(self) -> str:
        return CONFIDENCE_CRF if self.crf is not None else CONFIDENCE_NO_CRF

    def __call__(self, items: list[dict]) -> list[LabelledImage]:
        """Label a batch; returns the images that are finished (all of them unless the CRF runs in workers)."""
        ready = []
        for item in items:
            if item.get("error") is not None:
                self.failed[item["id"]] = str(item["error"])
        for item, maps in self._maps([it for it in items if it.get("error") is None]):
            ready += self._finish_one(item, maps)
        while len(self._pending) > self._max_pending:
            ready += self._collect(self._pending.popleft())
        return ready

    def finish(self) -> list[LabelledImage]:
        """Wait for the CRFs still in flight; returns their images."""
        ready = []
        while self._pending:
            ready += self._collect(self._pending.popleft())
        return ready

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self) -> "Labeller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- steps
    def _maps(self, items: list[dict]) -> list[tuple[dict, ClassMaps]]:
        """The batch at once; after an image error, each image alone, so one bad image does not stop the rest."""
        if not items:
            return []
        try:
            pixels = [it["pixels"] if it.get("pixels") is not None else self.clipes.preprocess(it["image"]) for it in items]
            return list(zip(items, self.clipes(pixels, [it["labels"] for it in items], [it["image"].shape[:2] for it in items])))
        except Exception as err:  # noqa: BLE001 - sorted by is_image_error below
            if not is_image_error(err):
                raise
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                hint = "; lower --model.max_side" if isinstance(err, torch.OutOfMemoryError) else ""
                self.failed[items[0]["id"]] = f"{type(err).__name__}: {err}{hint}"
                return []
            return [pair for item in items for pair in self._maps([item])]

    def _finish_one(self, item: dict, maps: ClassMaps) -> list[LabelledImage]:
        keys = maps.keys.cpu()
        scores = scores_with_background(maps.cams, self.bg_power)  # (1 + K, H, W) on the device
        done = LabelledImage(item=item, keys=keys.numpy(), mask=None, confidence=None)  # type: ignore[arg-type]
        if self.keep_stages:
            done.stages = {"cam": cams_to_label(maps.cams_raw, keys.to(maps.cams.device), self.bg_power),
                           "caa": class_ids(scores.argmax(dim=0), keys)}
        if self.keep_cams:
            done.cams = maps.cams.to(torch.float16).cpu().numpy()
        if self.crf is None:
            winner, confidence = share_confidence(scores)
            done.mask = class_ids(winner, keys).to(torch.uint8).cpu().numpy()
            done.confidence = confidence.cpu().numpy()
            return [done]
        host_scores = scores.float().cpu().numpy()
        if self._pool is None:
            try:
                return self._with_crf(done, crf_mask(item["image"], host_scores, self.crf, self.clipes.max_side))
            except Exception as err:  # noqa: BLE001 - one image's CRF failing is that image's failure
                self.failed[item["id"]] = f"CRF: {type(err).__name__}: {err}"
                return []
        future = self._pool.submit(crf_mask, item["image"], host_scores, self.crf, self.clipes.max_side)
        self._pending.append((done, future))
        return []

    def _collect(self, entry: tuple[LabelledImage, Future]) -> list[LabelledImage]:
        done, future = entry
        try:
            result = future.result()
        except BrokenProcessPool as err:
            raise RuntimeError("A CRF worker process died (out of memory?); lower --data.crf_workers.") from err
        except Exception as err:  # noqa: BLE001 - one image's CRF failing is that image's failure
            self.failed[done.item["id"]] = f"CRF: {type(err).__name__}: {err}"
            return []
        return self._with_crf(done, result)

    def _with_crf(self, done: LabelledImage, result: tuple[np.ndarray, np.ndarray]) -> list[LabelledImage]:
        winner, confidence = result
        mask = class_ids(torch.from_numpy(winner), torch.from_numpy(done.keys))
        done.mask, done.confidence = mask.numpy().astype(np.uint8), confidence.astype(np.float32)
        if self.keep_stages:
            done.stages["crf"] = mask
        return [done]
