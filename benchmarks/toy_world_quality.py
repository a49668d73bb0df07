"""Pseudo-label quality in the toy world: CAM / + CAA / + CRF mIoU of CLIP-ES with the shipped toy CLIP.

    python benchmarks/toy_world_quality.py [--images 200] [--split train] [--weights PATH] [--panels DIR]
        [--per_class] [--per_background] [--worst N] [--image_scale 3]

Rows: the trained toy CLIP; the same architecture with random weights (chance level); and the
paper's ablations with the trained weights: no background words, and plain GradCAM (gradient of
the class logit instead of its softmax probability). mIoU with background over ``1 + 10`` classes,
accumulated over the first ``--images`` images of the split (the world is written first when
``--root`` does not hold it). The CRF runs on the CAA maps with the paper's parameters and with
its two spatial widths scaled to the image size (the paper's were made for ~500 px images).
``--image_scale`` enlarges every image and its ground truth first (inference only), as VOC's ~500-px
images meet CLIP's 224-px training: the probe of docs/toy_clip_history.md, 2026-12-08.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lightning_clipes.components.clip_loader import SHIPPED, load_clip
from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.crf import CRFParams, crf_label
from lightning_clipes.components.pseudo_mask import cams_to_label, class_ids, scores_with_background
from lightning_clipes.data.toy_captions import TOY_CLIP_NAME, TOY_TEMPLATE
from lightning_clipes.data.synthetic import read_marker
from lightning_clipes.data.toy_scenes import TOY_BACKGROUNDS, TOY_CLASSES
from lightning_clipes.data.toy_world import MARKER, ToyWorldSource
from lightning_clipes.data.voc_format import load_mask, load_rgb
from lightning_clipes.metrics import iou_from_confmat

NUM_CLASSES = 1 + len(TOY_CLASSES)


def scaled_crf(params: CRFParams, image_side: int, reference_side: int = 500) -> CRFParams:
    """The CRF's spatial widths scaled from ``reference_side`` px images to ``image_side`` (not below 1)."""
    f = image_side / reference_side
    return dataclasses.replace(params, gaussian_sxy=max(1.0, params.gaussian_sxy * f),
                               bilateral_sxy=max(1.0, params.bilateral_sxy * f))


def read_items(root: Path, split: str, count: int):
    """The first ``count`` images of a split: (ids, images (H, W, 3) uint8, labels, ground truths (H, W) uint8)."""
    data = ToyWorldSource(root).read(split)
    n = min(count, len(data.ids))
    return (data.ids[:n], [load_rgb(p) for p in data.image_paths[:n]], data.labels[:n],
            [load_mask(p) for p in data.gt_paths[:n]])


def enlarge(images, gts, factor: float):
    """Images (bicubic) and ground truths (nearest, so labels stay labels) resized by ``factor``."""
    if factor == 1:
        return images, gts
    from PIL import Image

    def size(a: np.ndarray) -> tuple[int, int]:
        return round(a.shape[1] * factor), round(a.shape[0] * factor)

    return ([np.asarray(Image.fromarray(i).resize(size(i), Image.BICUBIC)) for i in images],
            [np.asarray(Image.fromarray(g).resize(size(g), Image.NEAREST)) for g in gts])


def class_maps(clipes: CLIPES, images, labels, batch_size: int = 16):
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        out += clipes([clipes.preprocess(im) for im in chunk], labels[i : i + batch_size], [im.shape[:2] for im in chunk])
    return out


def confmat(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    keep = gt != 255
    return np.bincount(NUM_CLASSES * gt[keep].astype(np.int64) + pred[keep], minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES)


def evaluate(maps, images, gts, bg_power: float, crfs: Sequence[CRFParams]) -> dict:
    """mIoU (%) of the CAM and CAA label maps and of the CRF on the CAA scores, one value per CRF setting."""
    cms = {k: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64) for k in ["cam", "caa", *range(len(crfs))]}
    preds = []
    for m, image, gt in zip(maps, images, gts):
        cam = cams_to_label(m.cams_raw, m.keys, bg_power).numpy()
        caa = cams_to_label(m.cams, m.keys, bg_power).numpy()
        cms["cam"] += confmat(cam, gt)
        cms["caa"] += confmat(caa, gt)
        row = [cam, caa]
        scores = scores_with_background(m.cams, bg_power).numpy()
        for j, params in enumerate(crfs):
            winner, _ = crf_label(image, scores, params)
            crf = class_ids(torch.from_numpy(winner), m.keys).numpy()
            cms[j] += confmat(crf, gt)
            row.append(crf)
        preds.append(row)
    ious = {k: iou_from_confmat(torch.from_numpy(cm)) for k, cm in cms.items()}  # (per class, NaN if absent; mean)
    result = {k: 100 * float(mean) for k, (_, mean) in ious.items()}
    result["per_class"] = {k: 100 * ious[k][0].numpy() for k in ("cam", "caa", 0) if k in ious}
    return result, preds


def scene_of(root: Path, image_id: str) -> str:
    """The background an annotation names (``<scene>``, written by the toy world)."""
    return ET.parse(root / "Annotations" / f"{image_id}.xml").findtext("scene", default="?")


def print_per_background(preds, gts, scenes) -> None:
    """IoU (%) of each class on each background, CAM → + CAA: where CAA gains and where it loses."""
    cms = {}
    for pred, gt, scene in zip(preds, gts, scenes):
        for stage in (0, 1):
            cms.setdefault((scene, stage), np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
            cms[(scene, stage)] += confmat(pred[stage], gt)
    backgrounds = [b for b in TOY_BACKGROUNDS if (b, 0) in cms]
    ious = {k: 100 * iou_from_confmat(torch.from_numpy(cm))[0].numpy() for k, cm in cms.items()}
    print("| class | " + " | ".join(backgrounds) + " |")
    print("| --- |" + " ---: |" * len(backgrounds))
    for c, name in enumerate(TOY_CLASSES, start=1):
        cells = ["–" if np.isnan(ious[(b, 0)][c]) else f"{ious[(b, 0)][c]:.0f} → {ious[(b, 1)][c]:.0f}" for b in backgrounds]
        print(f"| {name} | " + " | ".join(cells) + " |")


def caa_pixel_losses(preds, gts) -> list[int]:
    """Per scene, the pixels the CAM labels right minus those + CAA labels right (negative: CAA gains)."""
    return [int((p[0] == gt).sum()) - int((p[1] == gt).sum()) for p, gt in zip(preds, gts)]


def worst_scenes(losses: list[int], count: int) -> list[tuple[int, int]]:
    """The ``count`` scenes where + CAA loses most (``losses`` from :func:`caa_pixel_losses`): (pixels lost,
    index), largest first."""
    return sorted(((lost, i) for i, lost in enumerate(losses)), reverse=True)[:count]


def save_panels(folder: Path, ids, images, maps, preds, gts, tag: str, count: int) -> None:
    """image | CAM | CAA | CRF | GT (the strongest map over the image's classes, then the label maps)."""
    from PIL import Image

    from lightning_clipes.visualize import colour_mask, heatmap, tile_row

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(count, len(ids))):
        m = maps[i]
        tiles = [images[i], heatmap(m.cams_raw.max(0).values.numpy()), heatmap(m.cams.max(0).values.numpy()),
                 colour_mask(preds[i][0], images[i]), colour_mask(preds[i][1], images[i]),
                 colour_mask(preds[i][-1], images[i]), colour_mask(gts[i])]
        big = [np.asarray(Image.fromarray(t).resize((192, 192), Image.NEAREST)) for t in tiles]
        Image.fromarray(tile_row(big)).save(folder / f"{tag}_{ids[i]}.png")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="outputs/toy_world/VOC2012", help="the toy world (written if missing)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model_name", default=TOY_CLIP_NAME)
    parser.add_argument("--weights", default=SHIPPED)  # the package's toy CLIP (weights/<model_name>.pt)
    parser.add_argument("--template", default=TOY_TEMPLATE)
    parser.add_argument("--box_threshold", type=float, default=0.4)
    parser.add_argument("--image_scale", type=float, default=1.0,
                        help="enlarge images (bicubic) and ground truths (nearest) by this factor before the labeller")
    parser.add_argument("--affinity_layers", type=int, default=2, help="the embedded default's (experiments/synthetic.yaml)")
    parser.add_argument("--bg_power", type=float, default=1.0)
    parser.add_argument("--logit_scale", type=float, default=1.0,
                        help="of GradCAM's softmax, the embedded default's (experiments/synthetic.yaml); 0: the CLIP's own")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random-weights row")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"], help="the labeller's autocast")
    parser.add_argument("--rows", default="trained,random,no_background,plain_gradcam")
    parser.add_argument("--panels", default=None, help="folder for image | CAM | CAA | CAM-mask | CAA-mask | CRF | GT pictures")
    parser.add_argument("--num_panels", type=int, default=8)
    parser.add_argument("--per_class", action="store_true", help="also print each class's IoU per stage and labeler")
    parser.add_argument("--per_background", action="store_true",
                        help="also print each class's IoU on each background, CAM → + CAA, per labeler")
    parser.add_argument("--worst", type=int, default=0, help="also list the N scenes where + CAA loses most pixels "
                        "against the CAM (with --panels: their pictures instead of the first scenes')")
    args = parser.parse_args(argv)

    root = Path(args.root)
    ToyWorldSource(root, **(read_marker(root / MARKER) or {})).prepare()  # a world already there: as it was written
    ids, images, labels, gts = read_items(root, args.split, args.images)
    images, gts = enlarge(images, gts, args.image_scale)
    side = int(np.median([max(im.shape[:2]) for im in images]))
    crfs = [CRFParams(), scaled_crf(CRFParams(), side)]
    rows, label_maps, losses = {}, {}, {}  # per row: label maps for --per_background, pixels lost to CAA for --worst
    for row in args.rows.split(","):
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        clip = load_clip(args.model_name, None if row == "random" else args.weights)
        background = [] if row == "no_background" else list(TOY_BACKGROUNDS)
        clipes = CLIPES(clip, list(TOY_CLASSES), background, [args.template], box_threshold=args.box_threshold,
                        affinity_layers=min(args.affinity_layers, len(clip.model.visual.transformer.resblocks)),
                        softmax=row != "plain_gradcam", logit_scale=args.logit_scale or None, precision=args.precision)
        maps = class_maps(clipes, images, labels)
        rows[row], preds = evaluate(maps, images, gts, args.bg_power, crfs)
        if args.per_background:
            label_maps[row] = preds
        if args.worst:
            losses[row] = caa_pixel_losses(preds, gts)
        if args.panels:
            chosen = [i for _, i in worst_scenes(losses[row], args.worst)] if args.worst else range(min(args.num_panels, len(ids)))
            picked = ([seq[i] for i in chosen] for seq in (ids, images, maps, preds, gts))
            save_panels(Path(args.panels), *picked, row, len(chosen))
        rows[row]["seconds"] = time.perf_counter() - start
    print(f"\n{len(ids)} images of {args.split} ({root}), template {args.template!r}, image scale {args.image_scale:g}, box {args.box_threshold}, "
          f"affinity layers {args.affinity_layers}, bg power {args.bg_power}, precision {args.precision}; CRF scaled: sxy "
          f"{crfs[1].gaussian_sxy:g}/{crfs[1].bilateral_sxy:g}\n")
    print("| labeler | CAM | + CAA | + CRF (paper) | + CRF (scaled) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row, r in rows.items():
        print(f"| {row} | {r['cam']:.1f} | {r['caa']:.1f} | {r[0]:.1f} | {r[1]:.1f} |")
    if args.per_class:  # which classes the maps find: the mean hides a CLIP that knows half of them
        names = ["background", *TOY_CLASSES]
        print("\nIoU per class (%), CAM / + CAA / + CRF (paper)\n")
        print("| labeler | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for row, r in rows.items():
            cells = [" / ".join("–" if np.isnan(r["per_class"][k][c]) else f"{r['per_class'][k][c]:.0f}" for k in ("cam", "caa", 0))
                     for c in range(len(names))]
            print(f"| {row} | " + " | ".join(cells) + " |")
    if args.per_background:
        scenes = [scene_of(root, i) for i in ids]
        for row, preds in label_maps.items():
            print(f"\nIoU per class and background (%), CAM → + CAA, {row}\n")
            print_per_background(preds, gts, scenes)
    for row, lost_per_scene in losses.items():
        print(f"\nScenes where + CAA loses most against the CAM, {row} (all {len(ids)} scenes: "
              f"{sum(lost_per_scene)} pixels net)\n")
        print("| scene | background | classes | pixels lost |")
        print("| --- | --- | --- | ---: |")
        for lost, i in worst_scenes(lost_per_scene, args.worst):
            names = ", ".join(TOY_CLASSES[c] for c in labels[i])
            print(f"| {ids[i]} | {scene_of(root, ids[i])} | {names} | {lost} |")
    return rows


if __name__ == "__main__":
    main()
