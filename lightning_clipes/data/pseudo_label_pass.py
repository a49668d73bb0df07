"""The pseudo-label pass inside a training job: every rank labels images into the shared store.

Work is claimed image by image through the store (:meth:`PseudoLabelStore.claim`): each rank starts
with its own share and then takes whatever nobody holds, so a fast rank takes over a slow rank's
images and two jobs on one store label each image once. Ranks wait for each other by watching the
store, not in a collective, so no process-group timeout limits the pass; a rank that fails leaves an
``abort`` marker that stops the others, and a rank whose parent process died stops by itself. Under
SLURM auto-requeue, SIGUSR1 during the pass stops it cleanly and requeues the job (finished entries
are kept; the requeued job labels the rest).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from lightning_clipes.data.labeler_datamodule import LabeledImages, collate_items
from lightning_clipes.data.store import ClaimOwner, EntryRecord, PseudoLabelStore, StoreWriter, image_record


class RequeueRequested(Exception):
    """SIGUSR1 arrived during the labelling pass (SLURM's warning before the time limit)."""


class PassAborted(RuntimeError):
    """Another rank of this pass failed, or this rank lost its parent process."""


@dataclass
class PassPlan:
    """What a pass has to do, decided once (rank 0) and sent to every rank.

    records: per image of the split, its :class:`EntryRecord` now (None when the file cannot be read).
    todo: indices of the images whose entry is missing, damaged or made from another file or labels.
    """

    pass_id: str
    records: list[Optional[EntryRecord]]
    todo: list[int]


@dataclass
class PassResult:
    labelled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waited_s: float = 0.0


def plan_pass(images: LabeledImages, store: PseudoLabelStore, pass_id: str, threads: int = 16) -> PassPlan:
    """Check every image against its store entry (file headers only, ``threads`` at a time)."""

    def record(i: int) -> Optional[EntryRecord]:
        try:
            return image_record(images.image_paths[i], images.labels[i])
        except OSError:
            return None

    with ThreadPoolExecutor(threads) as pool:
        records = list(pool.map(record, range(len(images))))
        current = list(pool.map(lambda i: records[i] is not None and store.is_current(images.ids[i], records[i]),
                                range(len(images))))
    return PassPlan(pass_id, records, [i for i, ok in enumerate(current) if not ok])


class ClaimingBatchSampler(Sampler):
    """Batches of images this rank has claimed: its own share first, then everybody else's that nobody holds."""

    def __init__(self, plan: PassPlan, images: LabeledImages, store: PseudoLabelStore, owner: ClaimOwner,
                 rank: int, world_size: int, batch_size: int, claim_timeout: float, check) -> None:
        own = plan.todo[rank::world_size]
        others = [i for r in range(1, world_size) for i in plan.todo[(rank + r) % world_size::world_size]]
        self.order, self.plan, self.images, self.store, self.owner = own + others, plan, images, store, owner
        self.batch_size, self.claim_timeout, self.check = batch_size, claim_timeout, check

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in self.order:
            self.check()
            image_id = self.images.ids[i]
            if self.store.failure(image_id, self.plan.pass_id) is not None:
                continue
            if not _claim_unfinished(self.store, image_id, self.plan.records[i], self.owner, self.claim_timeout):
                continue
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


@contextmanager
def requeue_on_sigusr1(enabled: bool) -> Iterator[threading.Event]:
    """While the pass runs, SIGUSR1 sets the returned event instead of killing the process (Lightning
    installs its own requeue handler only after setup); the previous handler is restored after."""
    event = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGUSR1, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGUSR1, previous)


def requeue_slurm_job() -> int:
    """``scontrol requeue`` this SLURM job (as Lightning's handler does); returns the exit status."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"Unexpected SLURM job id {job!r}")
    return subprocess.call(["scontrol", "requeue", job])


def run_pass(labeler, images: LabeledImages, plan: PassPlan, store: PseudoLabelStore, device: torch.device,
             rank: int = 0, world_size: int = 1, batch_size: int = 8, num_workers: int = 0,
             crf_workers: Optional[int] = None, progress: bool = True, claim_timeout: float = 600.0,
             poll_interval: float = 2.0, requeue: bool = False) -> PassResult:
    """Label the images of ``plan.todo`` that this rank can claim, then wait until every one of them
    is finished (by any rank or job) or failed in this pass.

    Args:
        labeler: a :class:`~lightning_clipes.labeler.CLIPESLabeler` (moved to ``device``, then back to CPU).
        crf_workers: CRF processes (None: the labeler's setting, else the job's CPUs minus the loader's).
        claim_timeout: seconds after which another host's claim counts as abandoned.
        requeue: SIGUSR1 raises :class:`RequeueRequested` (under SLURM auto-requeue).
    Raises:
        PassAborted: another rank failed, or this rank's parent process died.
        RequeueRequested: SIGUSR1 arrived; this rank stopped after writing what it had finished.
    """
    owner, result = ClaimOwner.here(plan.pass_id), PassResult()
    abort_marker = store.root / "passes" / plan.pass_id / "abort"
    parent = os.getppid()
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise RequeueRequested()
        if abort_marker.is_file():
            raise PassAborted(f"Another rank stopped the labelling pass: {abort_marker.read_text()[:500]}")
        if os.getppid() != parent:
            raise PassAborted("This rank's parent process is gone (the job failed); stopping the labelling pass.")

    images = images.subset(range(len(images)))
    images.transform = labeler.clipes.preprocessor  # decode, resize and normalise in the loader's workers
    writer = StoreWriter(store, on_written=lambda image_id: store.release(image_id, owner))
    labeller = labeler.labeller(loader_workers=num_workers, crf_workers=crf_workers)
    bar = tqdm(total=len(plan.todo), disable=not progress, unit="img", dynamic_ncols=True,
               desc=f"CLIP-ES pseudo-labels ({world_size} rank{'s' if world_size > 1 else ''})")
    labeler.to(device)
    try:
        with requeue_on_sigusr1(requeue) as signalled:
            stop = signalled
            sampler = ClaimingBatchSampler(plan, images, store, owner, rank, world_size, batch_size, claim_timeout, check)
            loader = DataLoader(images, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_items)
            counter = _Progress(bar, store, [images.ids[i] for i in plan.todo], plan.pass_id)
            for batch in loader:
                _write(labeller(batch), plan, images, writer, result)
                counter.update()
                check()
            _write(labeller.finish(), plan, images, writer, result)
            writer.flush()
            start = time.monotonic()
            _wait_for_others(labeler, labeller, plan, images, store, owner, writer, result, check, claim_timeout,
                             poll_interval, counter)
            result.waited_s = time.monotonic() - start
            writer.close()
    except BaseException as err:
        if not isinstance(err, (RequeueRequested, PassAborted)):
            _mark_abort(abort_marker, rank, err)
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        for i in plan.todo:  # let others (or the requeued job) take what this rank still holds
            store.release(images.ids[i], owner)
        raise
    finally:
        labeller.close()
        bar.close()
        labeler.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for image_id, reason in labeller.failed.items():
        result.failed[image_id] = reason
    return result


def _write(done_list, plan: PassPlan, images: LabeledImages, writer: StoreWriter, result: PassResult) -> None:
    index = {image_id: i for i, image_id in enumerate(images.ids)} if done_list else {}
    for done in done_list:
        image_id = done.item["id"]
        record = plan.records[index[image_id]] or image_record(done.item["path"], done.item["labels"])
        writer.write(image_id, record, done.keys, done.mask, done.confidence)
        result.labelled.append(image_id)


def _wait_for_others(labeler, labeller, plan, images, store, owner, writer, result, check, claim_timeout,
                     poll_interval, counter) -> None:
    """Until every todo image is finished or failed: take over abandoned claims, else wait."""
    open_ids = {images.ids[i]: i for i in plan.todo}
    while True:
        for image_id, reason in labeller.failed.items():
            if store.failure(image_id, plan.pass_id) is None:
                store.record_failure(image_id, reason, plan.pass_id)
                store.release(image_id, owner)
        for image_id in list(open_ids):
            i = open_ids[image_id]
            record = plan.records[i]
            if (record is not None and store.is_current(image_id, record)) or store.failure(image_id, plan.pass_id):
                del open_ids[image_id]
        if not open_ids:
            return
        grabbed = [i for i in open_ids.values() if _claim_unfinished(store, images.ids[i], plan.records[i], owner,
                                                                     claim_timeout)]
        if grabbed:
            for start in range(0, len(grabbed), 8):
                _write(labeller([images[i] for i in grabbed[start:start + 8]]), plan, images, writer, result)
            _write(labeller.finish(), plan, images, writer, result)
            writer.flush()
            for i in grabbed:  # nothing came of it (failed): record it so that nobody waits for it
                image_id = images.ids[i]
                if image_id in labeller.failed and store.failure(image_id, plan.pass_id) is None:
                    store.record_failure(image_id, labeller.failed[image_id], plan.pass_id)
                    store.release(image_id, owner)
            continue
        check()
        counter.update(force=True)
        time.sleep(poll_interval)


def _claim_unfinished(store: PseudoLabelStore, image_id: str, record: Optional[EntryRecord], owner: ClaimOwner,
                      claim_timeout: float) -> bool:
    """Claim an image that is still unfinished. Checked again after the claim: another rank may have
    written it and released its claim between our look and our claim."""
    if not store.claim(image_id, owner, claim_timeout):
        return False
    if record is not None and store.is_current(image_id, record):
        store.release(image_id, owner)
        return False
    return True


class _Progress:
    """Moves the bar to the number of todo images finished by any rank, counted every few seconds."""

    def __init__(self, bar, store: PseudoLabelStore, ids: list[str], pass_id: str, every: float = 2.0) -> None:
        self.bar, self.store, self.ids, self.pass_id, self.every = bar, store, set(ids), pass_id, every
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        if self.bar.disable or (not force and time.monotonic() - self.last < self.every):
            return
        self.last = time.monotonic()
        try:
            done = len(self.ids.intersection(p[:-4] for p in os.listdir(self.store.root / "masks")))
        except OSError:
            return
        self.bar.n = min(done, self.bar.total)
        self.bar.refresh()


def _mark_abort(marker, rank: int, err: BaseException) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {rank}: {type(err).__name__}: {err}")
    except OSError:
        pass
