"""The pseudo-label pass inside a training job: every rank labels its shard into the shared store."""
from __future__ import annotations

import multiprocessing
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_clipes.components.pseudo_mask import class_ids, mask_and_confidence, scores_with_background
from lightning_clipes.data.store import PseudoLabelStore
from lightning_clipes.data.labeler_datamodule import LabeledImages, collate_items


def shard_todo(dataset: LabeledImages, store: PseudoLabelStore, rank: int, world_size: int) -> list[int]:
    """Indices of this rank's shard (every ``world_size``-th image from ``rank``) that still need labels.

    The shard is fixed before anything is written, so ranks never share an image; an entry that is
    present but does not decode is deleted and redone.
    """
    todo = []
    for i in range(rank, len(dataset), world_size):
        image_id = dataset.ids[i]
        if store.is_done(image_id) and store.is_readable(image_id):
            continue
        for path in (store.mask_path(image_id), store.confidence_path(image_id)):
            path.unlink(missing_ok=True)
        todo.append(i)
    return todo


def _finish(store: PseudoLabelStore, image_id: str, keys: np.ndarray, cams: np.ndarray, future: Future) -> None:
    winner, confidence = future.result()
    mask = class_ids(torch.from_numpy(winner), torch.from_numpy(keys)).numpy().astype(np.uint8)
    store.write(image_id, keys, cams, mask, confidence)


def fill_store(
    labeler,
    dataset: LabeledImages,
    store: PseudoLabelStore,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    num_workers: int = 0,
    crf_workers: int = 2,
    progress: bool = True,
) -> dict:
    """Label this rank's missing images and write them to ``store``.

    Args:
        labeler: a :class:`~lightning_clipes.labeler.CLIPESLabeler` (moved to ``device`` and back to CPU).
        crf_workers: processes for the dense CRF, which then overlaps the GPU work.
    Returns:
        ``{"labelled": [ids], "failed": {id: reason}}`` for this rank.
    """
    todo = shard_todo(dataset, store, rank, world_size)
    labelled: list[str] = []
    failed: dict[str, str] = {}
    if not todo:
        return {"labelled": labelled, "failed": failed}
    loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items)
    crf = labeler.crf_params
    pool: Optional[ProcessPoolExecutor] = (
        ProcessPoolExecutor(crf_workers, mp_context=multiprocessing.get_context("spawn")) if crf is not None else None
    )
    pending: list[tuple[str, np.ndarray, np.ndarray, Future]] = []
    labeler.to(device)
    try:
        for batch in tqdm(loader, disable=not progress, desc=f"CLIP-ES pseudo-labels (rank {rank}/{world_size})", unit="batch"):
            for item in batch:
                if item["error"] is not None:
                    failed[item["id"]] = item["error"]
            for item, maps in _label_robustly(labeler, [it for it in batch if it["error"] is None], failed):
                keys, cams = maps.keys.numpy(), maps.cams.float().cpu().numpy()
                if pool is None:
                    mask, conf = mask_and_confidence(maps.cams, maps.keys, labeler.bg_power)
                    store.write(item["id"], keys, cams, mask.cpu().numpy().astype(np.uint8), conf.cpu().numpy())
                else:
                    from lightning_clipes.components.crf import crf_label

                    scores = scores_with_background(maps.cams, labeler.bg_power).cpu().numpy().astype(np.float32)
                    pending.append((item["id"], keys, cams, pool.submit(crf_label, item["image"], scores, crf)))
                labelled.append(item["id"])
            while len(pending) > 4 * crf_workers:  # bounded memory: finish the oldest CRFs
                _finish(store, *pending.pop(0))
        for entry in pending:
            _finish(store, *entry)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        labeler.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        warnings.warn(
            f"Rank {rank}: no pseudo-label for {len(failed)} image(s), left out of training: "
            + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3]),
            stacklevel=2,
        )
    return {"labelled": labelled, "failed": failed}


def _label_robustly(labeler, items: list[dict], failed: dict[str, str]) -> list:
    """The batch at once; if that fails, each image alone, so one bad image does not stop the job."""
    if not items:
        return []
    try:
        return labeler.label_items(items)
    except (RuntimeError, ValueError) as err:
        if len(items) == 1:
            failed[items[0]["id"]] = f"{type(err).__name__}: {err}"
            return []
        results = []
        for item in items:
            results += _label_robustly(labeler, [item], failed)
        return results
