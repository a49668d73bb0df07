"""The whole labelling pass, ours against the reference, on the same images and weights: images/s.

    python benchmarks/labelling_pass.py [--reference PATH/CLIP-ES] [--images 16] [--device cuda]

Each side runs as its own process, timed from start to exit (imports, loading CLIP, text features,
decoding, cams, writing): ours is ``clipes predict -c experiments/voc_pseudo_labels.yaml``, the
reference its ``generate_cams_voc12.py`` (see ``reference_runner.py`` for what it needs). Random
ViT-B/16 weights in OpenAI's format (the cost does not depend on the values) and VOC-sized images
(500x375, 375x500, 500x333) with 1-3 labels. Ours runs without the CRF (the reference's generating
script has none; its CRF is a separate evaluation script), in each ``--precisions``, and once more with
the CRF; every row also writes the cams as the reference does, plus masks and confidence. Each later
row without the CRF is compared with the first: the share of pixels with the same pseudo-label (e.g.
bf16 or float16 against float32; random weights, so a hard case: their cams are differences of tiny terms).
A second table gives the steady state of the in-job pass (``run_pass``: loader workers, labeller,
CRF workers, store writers) without process start-up and CLIP loading, and on a GPU how busy it was.
Prints markdown tables; ``--json FILE`` keeps the numbers. A shared machine's speed drifts by 20-30 %
over minutes: ``--repeats 3`` runs the whole-process rows in three rounds and gives each row's median.
On a GPU machine:

    python benchmarks/labelling_pass.py --device cuda --images 512 --precisions 32,16 --reference PATH/CLIP-ES --reference-images 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import threading

import torch

from reference_runner import run_reference, write_images, write_random_openai_weights

REPO = Path(__file__).resolve().parents[1]
VOC_SIZES = [(500, 375), (375, 500), (500, 333)]


def run_ours(voc: Path, weights: Path, out: Path, device: str, precision: str, crf: bool, batch: int, workers: int,
             save_cams: bool = True) -> float:
    """Seconds of one ``clipes predict`` process over the split ``train`` of ``voc``."""
    cmd = [sys.executable, "-m", "lightning_clipes.cli", "predict", "-c", str(REPO / "experiments" / "voc_pseudo_labels.yaml"),
           "--data.root", str(voc), "--data.split", "train", "--model.pretrained", str(weights),
           "--trainer.default_root_dir", str(out), "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
           "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--model.precision", precision,
           "--model.crf", str(crf).lower(), "--model.save_cams", str(save_cams).lower(), "--model.preview_images", "0",
           "--data.batch_size", str(batch), "--data.num_workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"clipes predict failed:\n{done.stderr[-3000:]}")
    return seconds


def mask_agreement(first: Path, other: Path, ids) -> tuple[float, float]:
    """(worst, mean) share of pixels whose pseudo-label is the same in two runs' stores, over ``ids``."""
    from lightning_clipes.data.voc_format import load_mask

    shares = [float((load_mask(first / "pseudo_labels" / "masks" / f"{i}.png")
                     == load_mask(other / "pseudo_labels" / "masks" / f"{i}.png")).mean()) for i in ids]
    return min(shares), sum(shares) / len(shares)


def time_reference(args: argparse.Namespace, voc: Path, ids: list, weights: Path, out: Path) -> tuple[float, str]:
    """(seconds for all ``ids``, how they were had) of the reference's whole process."""
    ref_ids = ids[: max(2, args.reference_images or len(ids))]  # the reference fails on a 1-image list
    seconds = run_reference(args.reference, voc, ref_ids, weights, out / "all")
    note = f"{len(ref_ids)} images"
    if 2 < len(ref_ids) < len(ids):  # seconds it would take for all: start-up once, the images' part scaled
        start = run_reference(args.reference, voc, ids[:2], weights, out / "two")
        return start + (seconds - start) * (len(ids) - 2) / (len(ref_ids) - 2), f"{note} (on 2: {start:.1f} s), {len(ids)} estimated"
    if len(ref_ids) < len(ids):  # run on 2 only: no start-up to tell apart
        return seconds * len(ids) / len(ref_ids), f"{note}, {len(ids)} scaled"
    return seconds, note


def steady_state(voc: Path, weights: Path, store_dir: Path, device: str, precision: str, crf: bool, batch: int,
                 workers: int) -> tuple[float, float]:
    """(images/s, GPU busy share or nan) of the in-job labelling pass after start-up, in this process."""
    from lightning_clipes.data.labeler_datamodule import LabelerDataModule
    from lightning_clipes.data.pseudo_label_pass import plan_pass, run_pass
    from lightning_clipes.data.sources import VOCSource
    from lightning_clipes.data.store import PseudoLabelStore
    from lightning_clipes.labeler import CLIPESLabeler

    labeler = CLIPESLabeler(pretrained=str(weights), precision=precision, crf=crf, preview_images=0, save_cams=False)
    images = LabelerDataModule(VOCSource(voc), num_workers=workers).build_dataset("train")
    dev = torch.device(device)
    warm = PseudoLabelStore(store_dir / "warm")  # first calls compile kernels and fill caches
    run_pass(labeler, images.subset(range(2)), plan_pass(images.subset(range(2)), warm, "w"), warm, dev,
             batch_size=batch, num_workers=0, progress=False)
    store = PseudoLabelStore(store_dir / "timed")
    plan = plan_pass(images, store, "t")
    busy, stop = [], threading.Event()

    def sample() -> None:  # nvidia-smi's "utilization": share of time a kernel was running
        while not stop.wait(0.1):
            busy.append(torch.cuda.utilization(dev))

    sampler = threading.Thread(target=sample, daemon=True)
    if dev.type == "cuda":
        sampler.start()
    start = time.perf_counter()
    run_pass(labeler, images, plan, store, dev, batch_size=batch, num_workers=workers, progress=False)
    seconds = time.perf_counter() - start
    stop.set()
    return len(images) / seconds, (sum(busy) / len(busy) / 100 if busy else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a checkout of linyq2117/CLIP-ES (optional)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", help="ours, comma-separated: 32, bf16, 16, auto; the CRF row uses the last "
                        "(default: 32,16 on CUDA, bf16,32 on CPU: both ending with what auto picks there)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--no-crf", action="store_true", help="skip the rows with the CRF")
    parser.add_argument("--reference-images", type=int, help="run the reference on the first N images only (slow on "
                        "a GPU machine) and once more on 2, to estimate its time for all images from its start-up "
                        "and its time per image")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the whole-process rows (each round runs every "
                        "row once, so a slow spell of a shared machine hits all rows); a row's seconds are its median "
                        "round, its range in brackets")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.precisions is None:
        args.precisions = "32,16" if args.device == "cuda" else "bf16,32"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = [VOC_SIZES[i % len(VOC_SIZES)] for i in range(args.images)]
        voc, ids = write_images(tmp / "VOC2012", sizes, seed=0)
        weights = write_random_openai_weights(tmp / "ViT-B-16.pt")
        machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(f"Whole labelling pass, {len(ids)} VOC-sized images, random ViT-B/16, {machine}\n")
        print("| run | CRF | seconds | images/s | vs reference | labels as the first row (worst / mean) |")
        print("| --- | --- | --- | --- | --- | --- |")
        plan = [(p, False) for p in args.precisions.split(",")] + ([] if args.no_crf else [(args.precisions.split(",")[-1], True)])
        jobs = [] if args.reference is None else [lambda r: time_reference(args, voc, ids, weights, tmp / f"reference{r}")]
        jobs += [lambda r, k=k, p=p, crf=crf: (run_ours(voc, weights, tmp / f"ours{k}-{r}", args.device, p, crf,
                                                         args.batch_size, args.workers), "")
                 for k, (p, crf) in enumerate(plan)]
        times = [[job(r) for job in jobs] for r in range(args.repeats)]  # rounds: machine noise hits every row alike
        runs = [sorted(round_[j] for round_ in times) for j in range(len(jobs))]
        seconds = [run[len(run) // 2][0] for run in runs]  # the median round of each row
        spread = ["" if args.repeats == 1 else f" ({run[0][0]:.1f}–{run[-1][0]:.1f})" for run in runs]
        reference = seconds[0] if args.reference is not None else None
        if reference is not None:
            rows.append({"run": "reference generate_cams_voc12.py", "crf": False, "seconds_all_images": reference,
                         "rounds": [round_[0][0] for round_ in times]})
            print(f"| reference `generate_cams_voc12.py` (float32 on CPU, float16 on GPU), {runs[0][0][1]} | no | "
                  f"{reference:.1f}{spread[0]} | {len(ids) / reference:.2f} | 1.00 | – |", flush=True)
        for k, (precision, crf) in enumerate(plan):
            j = k + (reference is not None)
            ratio = f"{reference / seconds[j]:.2f}" if reference else "–"
            agree = "–"
            if k > 0 and not crf:  # e.g. bf16 against float32: same images, same weights
                worst, mean = mask_agreement(tmp / "ours0-0", tmp / f"ours{k}-0", ids)
                agree = f"{100 * worst:.2f} % / {100 * mean:.2f} %"
            rows.append({"run": f"clipes predict --model.precision {precision}", "crf": crf, "seconds": seconds[j],
                         "rounds": [round_[j][0] for round_ in times], "agreement": agree})
            print(f"| `clipes predict --model.precision {precision}` | {'yes' if crf else 'no'} | {seconds[j]:.1f}{spread[j]} | "
                  f"{len(ids) / seconds[j]:.2f} | {ratio} | {agree} |", flush=True)
        print("\nSteady state of the in-job pass (no start-up, no CLIP loading)\n")
        print("| precision | CRF | images/s | GPU busy |")
        print("| --- | --- | --- | --- |")
        for k, (precision, crf) in enumerate(plan):
            rate, busy = steady_state(voc, weights, tmp / f"steady{k}", args.device, precision, crf, args.batch_size,
                                      args.workers)
            rows.append({"run": f"run_pass --precision {precision}", "crf": crf, "images_per_s": rate, "gpu_busy": busy})
            print(f"| {precision} | {'yes' if crf else 'no'} | {rate:.2f} | "
                  f"{'–' if busy != busy else f'{100 * busy:.0f} %'} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "images": len(ids), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
