"""Labeler throughput: images/s of CLIPES on VOC-sized images, batched vs one class at a time.

    python benchmarks/labeler_throughput.py [--device cuda] [--images 16] [--model ViT-B-16]

Random ViT-B/16 weights (the cost does not depend on the values). Prints a markdown table; on a CPU a
second one times ``CPU_BATCH`` (images per ViT call there) on same-size images, in alternating rounds
(``--cpu-batches 1,2,6 --rounds 3``), since a shared machine's speed drifts.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import lightning_clipes.components.clipes as clipes_module
from lightning_clipes.components.clip_loader import load_clip
from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, VOC_BACKGROUND, VOC_PROMPT_NAMES


def run(clipes: CLIPES, images, labels, batch_size: int, per_class: bool, device: str) -> float:
    """Seconds for all images."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        xs = [clipes.preprocess(im) for im in chunk]
        labs = labels[i : i + batch_size]
        sizes = [im.shape[:2] for im in chunk]
        if per_class:  # naive: one call per (image, class)
            for x, lab, size in zip(xs, labs, sizes):
                for k in lab:
                    clipes([x], [[k]], [size])
        else:
            clipes(xs, labs, sizes)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--precision", default="32", help="32, bf16 or 16")
    parser.add_argument("--cpu-batches", default="1,2,6", help="CPU_BATCH values to time on a CPU ('' skips)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    clip = load_clip(args.model, None)
    clipes = CLIPES(clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], precision=args.precision).to(args.device)
    rng = np.random.default_rng(0)
    sizes = [(375, 500), (500, 375), (333, 500)]  # the common VOC shapes
    images = [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(args.images)]
    labels = [list(rng.choice(20, size=1 + i % 3, replace=False)) for i in range(args.images)]
    n_classes = sum(len(lab) for lab in labels)
    run(clipes, images[:2], labels[:2], 2, False, args.device)  # warm-up

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"CLIPES {args.model}, {args.images} images ({n_classes} class maps), precision {args.precision}, {name}\n")
    print("| schedule | batch | seconds | images/s |")
    print("| --- | --- | --- | --- |")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        sec = run(clipes, images, labels, bs, False, args.device)
        print(f"| batched classes | {bs} | {sec:.2f} | {args.images / sec:.2f} |")
    sec = run(clipes, images, labels, 1, True, args.device)
    print(f"| one call per class (whole ViT rerun per class) | 1 | {sec:.2f} | {args.images / sec:.2f} |")
    if args.device == "cpu" and args.cpu_batches:
        same = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.images)]
        values = [int(b) for b in args.cpu_batches.split(",")]
        rates: dict[int, list[float]] = {n: [] for n in values}
        default = clipes_module.CPU_BATCH
        for _ in range(args.rounds):  # alternate, so that a slow spell of the machine hits every value
            for n in values:
                clipes_module.CPU_BATCH = n
                rates[n].append(args.images / run(clipes, same, labels, n, False, args.device))
        clipes_module.CPU_BATCH = default
        print(f"\nImages per ViT call on a CPU (CPU_BATCH; default {default}), {args.images} images of 375x500, "
              f"median of {args.rounds} rounds\n")
        print("| CPU_BATCH | images/s (median) | rounds |")
        print("| --- | --- | --- |")
        for n, r in rates.items():
            print(f"| {n} | {np.median(r):.2f} | {' '.join(f'{x:.2f}' for x in r)} |")


if __name__ == "__main__":
    main()
