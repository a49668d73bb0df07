"""The whole labelling pass, ours against the reference, on the same images and weights: images/s.

    python benchmarks/labelling_pass.py [--reference PATH/CLIP-ES] [--images 16] [--device cuda]

Each side runs as its own process, timed from start to exit (imports, loading CLIP, text features,
decoding, cams, writing): ours is ``clipes predict -c experiments/voc_pseudo_labels.yaml``, the
reference its ``generate_cams_voc12.py`` (see ``reference_runner.py`` for what it needs). Random
ViT-B/16 weights in OpenAI's format (the cost does not depend on the values) and VOC-sized images
(500x375, 375x500, 500x333) with 1-3 labels. Ours runs without the CRF (the reference's generating
script has none; its CRF is a separate evaluation script), in each ``--precisions``, and once more with
the CRF; every row also writes the cams as the reference does, plus masks and confidence.
Prints a markdown table; ``--json FILE`` keeps the numbers.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a checkout of linyq2117/CLIP-ES (optional)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="32,auto", help="ours, comma-separated: 32, bf16, 16, auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--no-crf", action="store_true", help="skip the row with the CRF")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = [VOC_SIZES[i % len(VOC_SIZES)] for i in range(args.images)]
        voc, ids = write_images(tmp / "VOC2012", sizes, seed=0)
        weights = write_random_openai_weights(tmp / "ViT-B-16.pt")
        machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(f"Whole labelling pass, {len(ids)} VOC-sized images, random ViT-B/16, {machine}\n")
        print("| run | CRF | seconds | images/s | vs reference |")
        print("| --- | --- | --- | --- | --- |")
        reference = None
        if args.reference is not None:
            reference = run_reference(args.reference, voc, ids, weights, tmp / "reference")
            rows.append({"run": "reference generate_cams_voc12.py", "crf": False, "seconds": reference})
            print(f"| reference `generate_cams_voc12.py` (float32 on CPU, float16 on GPU) | no | {reference:.1f} | "
                  f"{len(ids) / reference:.2f} | 1.00 |", flush=True)
        plan = [(p, False) for p in args.precisions.split(",")] + ([] if args.no_crf else [(args.precisions.split(",")[-1], True)])
        for k, (precision, crf) in enumerate(plan):
            seconds = run_ours(voc, weights, tmp / f"ours{k}", args.device, precision, crf, args.batch_size, args.workers)
            ratio = f"{reference / seconds:.2f}" if reference else "–"
            rows.append({"run": f"clipes predict --model.precision {precision}", "crf": crf, "seconds": seconds})
            print(f"| `clipes predict --model.precision {precision}` | {'yes' if crf else 'no'} | {seconds:.1f} | "
                  f"{len(ids) / seconds:.2f} | {ratio} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "images": len(ids), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
