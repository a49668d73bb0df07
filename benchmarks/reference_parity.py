"""Parity of our class maps with the reference CLIP-ES on the same images and weights.

    python benchmarks/reference_parity.py --reference PATH/CLIP-ES [--images 51] [--weights ViT-B-16.pt]

Without ``--weights`` it uses random ViT-B/16 weights in OpenAI's format (two sets: plain, and with
perturbed biases and LayerNorms). Random weights are the hard case: their gradients are ~1e-7, so
CAA's min-max step magnifies last-bit differences. For each schedule of ours (``reference_order``:
the reference's arithmetic order; ``batched``: the default) it prints the mean and worst |Δ| of the
CAA cams (``attn_highres``) and the share of pixels whose label (argmax over [1 - max cam, cams])
agrees. The project's limits: worst mean |Δ| ≤ 0.01 and agreement ≥ 99 %, in float32.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from reference_runner import read_reference, run_reference, write_images, write_random_openai_weights
from lightning_clipes.components.clip_loader import load_clip
from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, VOC_BACKGROUND, VOC_PROMPT_NAMES
from lightning_clipes.data.voc_format import VOC_CLASSES, load_rgb, parse_labels

# 16x16 … 500x500 with odd and thin shapes (the reference crashes on 76-patch images such as 304x64)
SIZES = [(16, 16), (33, 17), (17, 33), (47, 31), (40, 16), (64, 64), (100, 75), (75, 100), (128, 96),
         (160, 120), (200, 150), (250, 187), (320, 240), (333, 500), (375, 500), (500, 375), (500, 333),
         (480, 360), (500, 500), (353, 281)]


def label(cams: np.ndarray) -> np.ndarray:
    return np.concatenate([1 - cams.max(0, keepdims=True), cams]).argmax(0)


def compare(reference_out: Path, voc: Path, ids: list[str], weights: Path, reference_order: bool, device: str,
            verbose: bool = False) -> dict:
    clipes = CLIPES(load_clip("ViT-B-16", str(weights)), VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE],
                    precision="32", reference_order=reference_order).to(device)
    diffs, worst, agree = [], 0.0, []
    for image_id in ids:
        ref = read_reference(reference_out, image_id)
        if ref is None:
            continue
        image = load_rgb(voc / "JPEGImages" / f"{image_id}.jpg")
        labels = parse_labels(voc / "Annotations" / f"{image_id}.xml", VOC_CLASSES)
        (maps,) = clipes([clipes.preprocess(image)], [labels], [image.shape[:2]])
        ours = maps.cams.cpu().numpy().astype(np.float16).astype(np.float32)  # the reference stores float16
        assert ref[0].tolist() == maps.keys.tolist(), (image_id, ref[0], maps.keys)
        delta = np.abs(ours - ref[1])
        diffs.append(float(delta.mean()))
        worst = max(worst, float(delta.max()))
        agree.append(float((label(ours) == label(ref[1])).mean()))
        if verbose:
            print(f"  {image_id} {image.shape[1]}x{image.shape[0]} labels {labels}: mean |d| {diffs[-1]:.5f}, "
                  f"max {float(delta.max()):.4f}, agreement {100 * agree[-1]:.2f} %")
    return {"images": len(diffs), "mean": float(np.mean(diffs)), "worst_mean": float(np.max(diffs)),
            "worst_pixel": worst, "worst_agreement": float(np.min(agree)), "mean_agreement": float(np.mean(agree))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of linyq2117/CLIP-ES")
    parser.add_argument("--images", type=int, default=len(SIZES))
    parser.add_argument("--weights", type=Path, help="OpenAI-format weights (default: two random sets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", type=Path, help="write the images, weights and reference outputs here and reuse them")
    parser.add_argument("--verbose", action="store_true", help="one line per image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        sizes = [SIZES[i % len(SIZES)] for i in range(args.images)]
        voc, ids = write_images(tmp / "VOC2012", sizes, seed=1)
        weight_sets = [("given", args.weights)] if args.weights else [
            ("random", tmp / "random.pt"), ("random, perturbed biases/LN", tmp / "perturbed.pt")]
        if not args.weights:
            for (_, path), seed in zip(weight_sets, (0, 1)):
                if not path.is_file():
                    write_random_openai_weights(path, seed=seed, perturb=0.05 * seed)
        print(f"Parity with the reference on {len(ids)} images ({min(sizes)} … {max(sizes)}), float32, {args.device}\n")
        print("| weights | ours | images | mean abs diff | worst image mean | worst pixel | label agreement (worst / mean) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, weights in weight_sets:
            out = tmp / f"reference-{weights.stem}"
            done = out.is_dir() and all((out / f"{i}.npy").is_file() for i in ids)
            seconds = 0.0 if done else run_reference(args.reference, voc, ids, weights, out)
            for reference_order in (True, False):
                r = compare(out, voc, ids, weights, reference_order, args.device, args.verbose)
                schedule = "reference order" if reference_order else "batched (default)"
                print(f"| {name} | {schedule} | {r['images']} | {r['mean']:.5f} | {r['worst_mean']:.5f} | "
                      f"{r['worst_pixel']:.4f} | {100 * r['worst_agreement']:.2f} % / {100 * r['mean_agreement']:.2f} % |",
                      flush=True)
            print(f"<!-- reference run: {seconds:.1f} s -->")


if __name__ == "__main__":
    main()
