"""The segmentation student as plain torch: an architecture registry over segmentation-models-pytorch,
the encoder's input normalisation, and a wrapper that takes [0, 1] images of any size.

    net = create_student("DeepLabV3Plus", "resnet101", "imagenet", num_classes=21)
    load_network_weights(net, "coco_student.ckpt", exclude=["segmentation_head"])  # optional warm start
    student = PaddedSegmenter(net, *encoder_normalisation("resnet101"))
    logits = student(images)                   # (B, 21, H, W) for images (B, 3, H, W) in [0, 1]
    probs = student.predict_probabilities(images, scales=(0.5, 1.0, 1.5), flip=True)

Architectures: smp's, plus ``DeepLabV2`` (the paper's student, :mod:`~lightning_clipes.components.deeplabv2`).
Nothing here downloads anything except ``create_student`` with ``encoder_weights`` set (smp fetches
the ImageNet weights from the Hugging Face hub on first use and caches them).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from lightning_clipes.components.deeplabv2 import DeepLabV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name (lower case) -> builder(encoder_name, encoder_weights, num_classes) -> nn.Module
_CUSTOM_ARCHITECTURES: dict[str, Callable[[str, Optional[str], int], nn.Module]] = {}


def available_architectures() -> list[str]:
    """Valid ``arch`` names: smp's architectures (any case) and those added by ``register_architecture``."""
    return sorted({*smp.MODEL_ARCHITECTURES_MAPPING, *_CUSTOM_ARCHITECTURES})


def register_architecture(name: str, builder: Callable[[str, Optional[str], int], nn.Module]) -> None:
    """Add an architecture: ``builder(encoder_name, encoder_weights, num_classes)`` returns a module that
    maps (B, 3, H, W) normalised images to (B, num_classes, H, W) logits (tests register tiny ones)."""
    _CUSTOM_ARCHITECTURES[name.lower()] = builder


def create_student(
    arch: str = "DeepLabV3Plus",
    encoder_name: str = "resnet101",
    encoder_weights: Optional[str] = "imagenet",
    num_classes: int = 21,
    arch_kwargs: Optional[dict] = None,
) -> nn.Module:
    """A segmentation network with randomly initialised head (and ImageNet encoder if asked).

    Args:
        arch: an smp architecture (``DeepLabV3Plus``, ``Unet``, ``FPN`` …, case-insensitive) or a
            registered one; see :func:`available_architectures`.
        encoder_name: an smp encoder (``resnet101``, ``resnet18``, ``tu-<timm name>`` …).
        encoder_weights: ``imagenet`` (downloaded once by smp), another tag of that encoder, or
            ``None`` for random weights.
        num_classes: output channels, background included (21 for VOC).
        arch_kwargs: further keyword arguments of the smp architecture, e.g. ``{"decoder_channels": [64, 32,
            32, 16, 16]}`` for a slimmer U-Net decoder (not for registered architectures).
    Returns:
        a module mapping (B, 3, H, W) float32 normalised images to (B, num_classes, H, W) logits;
        smp models need H and W divisible by 32 (:class:`PaddedSegmenter` pads for you).
    Raises:
        ValueError: unknown architecture or encoder (the message lists the valid names).
        RuntimeError: the encoder weights could not be downloaded.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}.")
    key = arch.lower()
    if key not in _CUSTOM_ARCHITECTURES and key not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ValueError(f"Unknown student architecture {arch!r}; valid names: {available_architectures()}.")
    if arch_kwargs and key in _CUSTOM_ARCHITECTURES:
        raise ValueError(f"arch_kwargs are for smp architectures; {arch!r} is a registered one and takes none.")
    try:
        if key in _CUSTOM_ARCHITECTURES:
            return _CUSTOM_ARCHITECTURES[key](encoder_name, encoder_weights, num_classes)
        return smp.create_model(key, encoder_name=encoder_name, encoder_weights=encoder_weights, classes=num_classes,
                                **(arch_kwargs or {}))
    except KeyError as err:  # smp's unknown encoder / unknown weights tag
        raise ValueError(f"{err.args[0]} (set --model.encoder_name / --model.encoder_weights).") from None
    except OSError as err:  # hub download failed (no network, no cache)
        raise RuntimeError(
            f"Could not fetch the {encoder_weights!r} weights of encoder {encoder_name!r} ({err}). Connect to the "
            "internet once so that smp caches them (~/.cache/huggingface), or set --model.encoder_weights null "
            "to start from random weights."
        ) from err


register_architecture("DeepLabV2", lambda encoder, weights, n: DeepLabV2(encoder, weights, n))


def encoder_normalisation(
    encoder_name: str, encoder_weights: Optional[str] = "imagenet"
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel for images in [0, 1], as smp's ``get_preprocessing_params`` gives them.

    Read without network: timm's pretrained config for ``tu-`` encoders, otherwise the ``config.json``
    that smp cached beside the weights (``create_student`` with weights fetches it). Falls back to the
    ImageNet statistics when the encoder or its config is unknown, e.g. for random weights. Encoders
    whose config says ``input_range [0, 255]`` get their statistics divided by 255.
    """
    settings = None
    try:
        if encoder_name.startswith("tu-"):
            import timm

            cfg = timm.models.get_pretrained_cfg(encoder_name[3:])
            settings = cfg.__dict__ if cfg is not None else None
        elif encoder_weights is not None and encoder_name in smp.encoders.encoders:
            from huggingface_hub import hf_hub_download

            spec = smp.encoders.encoders[encoder_name]["pretrained_settings"][encoder_weights]
            path = hf_hub_download(spec["repo_id"], "config.json", revision=spec["revision"], local_files_only=True)
            with open(path) as f:
                settings = json.load(f)
    except Exception:  # not cached, unknown tag, no timm entry: the ImageNet statistics are the right guess
        settings = None
    if not settings or "mean" not in settings or "std" not in settings:
        return IMAGENET_MEAN, IMAGENET_STD
    scale = float(max(settings.get("input_range") or [0, 1]))
    mean = tuple(float(m) / scale for m in settings["mean"])
    std = tuple(float(s) / scale for s in settings["std"])
    return mean, std  # type: ignore[return-value]


class PaddedSegmenter(nn.Module):
    """``net`` behind the encoder's normalisation and padding, so any (H, W) in [0, 1] goes in.

    Args:
        net: maps (B, 3, h, w) normalised images, h and w multiples of ``multiple``, to (B, C, h, w) logits.
        mean, std: per-channel statistics of the encoder for [0, 1] RGB (persistent buffers, so a
            checkpoint carries them).
        multiple: pad H and W up to a multiple of this (32 for smp encoders; more if the encoder's
            output stride needs it). A ``net`` with an ``input_multiple`` attribute (``DeepLabV2``: 8)
            sets it instead: dilated networks take any size, and padding to their stride only aligns
            the upsampled logits.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 multiple: int = 32) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        own = getattr(net, "input_multiple", None)
        self.channels_last = False  # set by use_channels_last()
        stride = getattr(getattr(net, "encoder", None), "output_stride", multiple)
        if isinstance(own, int) and own > 0:
            self.multiple = own
        else:
            self.multiple = math.lcm(int(multiple), int(stride)) if isinstance(stride, int) and stride > 0 else multiple

    def use_channels_last(self) -> "PaddedSegmenter":
        """Keep weights and inputs in channels-last (NHWC) memory layout."""
        self.net.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, C, H, W) float32 logits, for any H, W >= 1."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}.")
        h, w = images.shape[-2:]
        x = (images.float() - self.mean) / self.std
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:  # zeros after normalisation = the mean colour, on the right and bottom
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.channels_last:  # NHWC: the layout fast convolution kernels want (GPU tensor cores, oneDNN)
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        if logits.shape[-2:] != x.shape[-2:]:  # an architecture with a strided head
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    @torch.no_grad()
    def predict_probabilities(self, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
        """Softmax probabilities averaged over input scales and (optionally) the horizontal flip.

        Each scale resizes the input bilinearly (align_corners=False) to round(s·H) × round(s·W), and
        its logits are resized back to H × W before the softmax; a flipped input's logits are flipped back.

        Args:
            images: (B, 3, H, W) float in [0, 1].
        Returns:
            (B, C, H, W) float32 probabilities (each pixel sums to 1).
        """
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}.")
        h, w = images.shape[-2:]
        total = None
        for s in scales:
            x = images
            if s != 1.0:
                size = (max(1, round(h * s)), max(1, round(w * s)))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                logits = self(x.flip(-1) if flipped else x)
                logits = logits.flip(-1) if flipped else logits
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                probs = logits.float().softmax(1)
                total = probs if total is None else total + probs
        return total / (len(scales) * (2 if flip else 1))


# ------------------------------------------------------------------------------------ warm start
def _network_state_dict(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """The network's tensors from a SegmentationStudent checkpoint (keys ``model.net.*``), a
    ``PaddedSegmenter`` state dict (``net.*``) or a bare network state dict; the normalisation buffers
    (``mean``/``std``) are not network weights and are dropped."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"init_checkpoint {path} holds neither a Lightning checkpoint nor a state dict of tensors; give a "
            "SegmentationStudent checkpoint (.ckpt) or torch.save(network.state_dict())."
        )
    for prefix in ("model.net.", "net.", "module."):
        if checkpoint and all(k.startswith(prefix) or k in ("model.mean", "model.std", "mean", "std") for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in checkpoint.items() if k not in ("mean", "std")}


def _first(names: Sequence[str], n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


SHIPPED_ENCODER = "shipped"  # init_checkpoint tag: the package's toy-world encoder for the student's encoder_name


def shipped_encoder(encoder_name: str) -> str:
    """The file behind ``init_checkpoint: shipped``: the toy-world encoder the package ships for
    ``encoder_name`` (``lightning_clipes/weights/encoders/<encoder_name>.pt``, written by
    :class:`lightning_clipes.toy_encoder.ToyEncoder`)."""
    from lightning_clipes.components.clip_loader import WEIGHTS_DIR

    path = WEIGHTS_DIR / "encoders" / f"{encoder_name}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in (WEIGHTS_DIR / "encoders").glob("*.pt"))
        raise FileNotFoundError(
            f"The package ships no toy-world encoder for {encoder_name!r} (it has: {', '.join(have) or 'none'}). "
            "Train one with `clipes fit -c experiments/toy_encoder.yaml --model.encoder_name NAME "
            "--model.export_path FILE` and pass --model.init_checkpoint FILE, or set --model.init_checkpoint null."
        )
    return str(path)


def load_network_weights(net: nn.Module, path: str, exclude: Sequence[str] = ()) -> list[str]:
    """Copy the weights of a checkpoint into ``net`` (a warm start), except the modules in ``exclude``.

    Every key of ``net`` outside ``exclude`` must be in the checkpoint with the same shape, and the
    checkpoint may hold nothing else outside ``exclude``; otherwise nothing is loaded and the error
    names the missing, unexpected and mis-shaped keys (the first few of each, with counts).

    Args:
        net: the freshly built network (``create_student``'s output).
        path: a SegmentationStudent checkpoint, a ``PaddedSegmenter`` state dict or a bare state dict of
            the same architecture. Loaded with ``weights_only=False`` (Lightning checkpoints hold
            hyper-parameter objects): use checkpoints you trust.
        exclude: module names of ``net`` (``aspp`` in DeepLabV2, ``segmentation_head`` in smp models) whose
            parameters and buffers keep their fresh initialisation, e.g. a classifier trained for another
            number of classes; the checkpoint's keys under those names are ignored.
    Returns:
        the keys that were loaded.
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an ``exclude`` name that is no module of ``net``, or a checkpoint that does not fit.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"init_checkpoint {path} does not exist; give the path of a student checkpoint (e.g. a run's "
            "checkpoints/last.ckpt) or set --model.init_checkpoint null."
        )
    source = _network_state_dict(torch.load(path, map_location="cpu", weights_only=False), path)
    target = net.state_dict()
    modules = {name for name, _ in net.named_modules() if name}
    unknown = [e for e in exclude if e not in modules]
    if unknown:
        top = sorted(name for name, _ in net.named_children())
        raise ValueError(f"init_exclude names {unknown}, which are no modules of the network; its top-level modules: {top}.")

    def excluded(key: str) -> bool:
        return any(key == e or key.startswith(e + ".") for e in exclude)

    source = {k: v for k, v in source.items() if not excluded(k)}
    wanted = {k: v for k, v in target.items() if not excluded(k)}
    missing = [k for k in wanted if k not in source]
    unexpected = [k for k in source if k not in wanted]
    reshaped = [k for k in wanted if k in source and source[k].shape != wanted[k].shape]
    if missing or unexpected or reshaped:
        lines = [f"init_checkpoint {path} does not fit this network (nothing was loaded):"]
        if missing:
            lines.append(f"  {len(missing)} keys missing from the checkpoint: {_first(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys in the checkpoint: {_first(unexpected)}")
        if reshaped:
            shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(wanted[k].shape)}" for k in sorted(reshaped)[:3]]
            more = f", … ({len(reshaped) - 3} more)" if len(reshaped) > 3 else ""
            lines.append(f"  {len(reshaped)} keys of another shape (checkpoint vs network): {'; '.join(shapes)}{more}")
        culprits = sorted({k.split(".")[0] for k in missing + unexpected + reshaped})
        if "encoder" in culprits or not culprits:
            lines.append("  The encoder differs: check that --model.arch and --model.encoder_name are those the "
                         "checkpoint was trained with.")
        else:
            names = ", ".join(culprits)
            lines.append(
                f"  The differing keys are under [{names}]. If that is the classifier trained for another number "
                f"of classes, keep it freshly initialised with --model.init_exclude '[{names}]'; otherwise check "
                "that --model.arch is the checkpoint's."
            )
        raise ValueError("\n".join(lines))
    net.load_state_dict(source, strict=False)  # strict=False only for the excluded keys, checked above
    return sorted(source)
