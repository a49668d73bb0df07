"""Training throughput of the student: SegmentationStudent under a Lightning Trainer against a bare
segmentation-models-pytorch loop, on the same crops.

    python benchmarks/student_throughput.py [--arch DeepLabV3Plus --encoder resnet101 --crop 512 --batch 4]
        [--device cuda] [--steps 30] [--precisions 32-true,bf16-mixed] [--channels-last both]

Both sides train the same network (random weights) on the same in-memory batches of random crops with
255-ignore pixels, SGD momentum 0.9, for ``--steps`` steps after ``--warmup`` steps, and report crops/s.
Ours adds what a real run has: the padding/normalising wrapper, the confidence-guided loss, the poly
schedule, metric logging and Lightning's loop; no validation and no checkpoints (they are not per-step
costs). The bare loop is ``loss = cross_entropy(net((x - mean) / std), y); loss.backward(); opt.step()``
with ``torch.autocast`` for bf16. Prints a markdown table with ours / bare.
"""
from __future__ import annotations

import argparse
import logging
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_clipes.components.student_factory import IMAGENET_MEAN, IMAGENET_STD, create_student
from lightning_clipes.student import SegmentationStudent


class Crops(Dataset):
    """The same ``n`` crops every epoch: {"image": (3, c, c) in [0, 1], "mask": (c, c) int64 with 255s}."""

    def __init__(self, n: int, crop: int, classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, crop, crop, generator=g)
        masks = torch.randint(0, classes, (n, crop, crop), generator=g)
        masks[torch.rand(n, crop, crop, generator=g) < 0.3] = 255  # unconfident pixels, as with CGL
        self.masks = masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i]}


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, None, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def ours(args, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = SegmentationStudent(num_classes=args.classes, arch=args.arch, encoder_name=args.encoder,
                                encoder_weights=None, head_lr_mult=10.0, channels_last=channels_last, num_panels=0)
    timer = Timer(args.warmup)
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        limit_val_batches=0, log_every_n_steps=1)
    data = DataLoader(Crops(args.batch * 4, args.crop, args.classes), batch_size=args.batch, shuffle=True, drop_last=True)
    trainer.fit(model, data)
    return args.steps * args.batch / timer.seconds


def bare(args, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = create_student(args.arch, args.encoder, None, args.classes).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    crops = Crops(args.batch * 4, args.crop, args.classes)
    batches = [(crops.images[i:i + args.batch].to(device), crops.masks[i:i + args.batch].to(device))
               for i in range(0, len(crops), args.batch)]
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = batches[step % len(batches)]
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="DeepLabV3Plus")
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--channels-last", choices=["no", "yes", "both"], default="both")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the table only
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.arch} / {args.encoder}, {args.batch} crops of {args.crop}, {name}: crops/s over {args.steps} steps\n")
    print("| precision | channels_last | bare smp loop | SegmentationStudent + Trainer | ours / bare |")
    print("| --- | --- | --- | --- | --- |")
    layouts = {"no": [False], "yes": [True], "both": [False, True]}[args.channels_last]
    for precision in args.precisions.split(","):
        for channels_last in layouts:
            b, o = bare(args, precision, channels_last), ours(args, precision, channels_last)
            print(f"| {precision} | {channels_last} | {b:.2f} | {o:.2f} | {o / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
