"""Optimizer parameter groups of the student: a pretrained backbone at the base learning rate and a
freshly initialised head at a multiple of it.

The DeepLab recipe (Caffe's ``lr_mult`` / ``decay_mult``, carried over by deeplab-pytorch's ``main.py``):

=============  =====================================  =========  ==================
group          parameters                             LR         weight decay
=============  =====================================  =========  ==================
``backbone``   everything under ``net.encoder``       1 x base   the optimizer's
``head``       everything else (decoder, classifier)  10 x base  the optimizer's
``head_bias``  head parameters named ``*.bias``       20 x base  0
=============  =====================================  =========  ==================

deeplab-pytorch builds the same three groups for DeepLab v2 (``get_params`` keys ``1x``, ``10x``,
``20x``; its ASPP biases get ``weight_decay: 0.0``); ``head_bias`` exists only when a bias multiplier
is given. Parameters with ``requires_grad = False`` (frozen BatchNorm) are in no group.

The groups carry the multiplier as ``lr_mult`` and go to the optimizer *without* an ``lr``, so the
optimizer's own ``lr`` (from YAML) is the base LR; :func:`apply_lr_multipliers` then scales each group
before the LR scheduler records its starting values. ``name`` names the group in LearningRateMonitor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def check_group_settings(
    head_lr_mult: float, head_bias_lr_mult: Optional[float], head_bias_weight_decay: Optional[float]
) -> None:
    """Raise ValueError on multipliers <= 0 or a bias weight decay without a bias group."""
    for name, value in (("head_lr_mult", head_lr_mult), ("head_bias_lr_mult", head_bias_lr_mult)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}.")
    if head_bias_weight_decay is not None and head_bias_lr_mult is None:
        raise ValueError(
            "head_bias_weight_decay applies to the separate group of head biases; set head_bias_lr_mult too "
            "(20 in DeepLab v2), or leave head_bias_weight_decay null."
        )


def parameter_groups(
    net: nn.Module,
    head_lr_mult: float = 1.0,
    head_bias_lr_mult: Optional[float] = None,
    head_bias_weight_decay: Optional[float] = None,
) -> list[dict]:
    """Split ``net``'s trainable parameters into backbone / head (/ head bias) groups.

    Args:
        net: the segmentation network; its ``encoder`` attribute is the backbone. A network without one
            (a test's 1x1 convolution) is one ``backbone`` group at the base LR: there is no way to tell
            pretrained parts from new ones.
        head_lr_mult: LR of the head / base LR (10 in DeepLab).
        head_bias_lr_mult: LR of the head's biases / base LR (20 in DeepLab v2); ``None`` = no separate
            group, biases go with the head.
        head_bias_weight_decay: weight decay of that group (0 in deeplab-pytorch); ``None`` = the
            optimizer's. Only with ``head_bias_lr_mult``.
    Returns:
        ``[{"name", "params", "lr_mult"[, "weight_decay"]}, …]``, non-empty groups only, every trainable
        parameter in exactly one.
    """
    check_group_settings(head_lr_mult, head_bias_lr_mult, head_bias_weight_decay)
    encoder = getattr(net, "encoder", None)
    backbone_ids = {id(p) for p in encoder.parameters()} if isinstance(encoder, nn.Module) else None
    backbone, head, head_bias = [], [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if backbone_ids is None or id(p) in backbone_ids:
            backbone.append(p)
        elif head_bias_lr_mult is not None and name.endswith("bias"):
            head_bias.append(p)
        else:
            head.append(p)
    groups = [
        {"name": "backbone", "params": backbone, "lr_mult": 1.0},
        {"name": "head", "params": head, "lr_mult": float(head_lr_mult)},
    ]
    if head_bias_lr_mult is not None:
        bias_group = {"name": "head_bias", "params": head_bias, "lr_mult": float(head_bias_lr_mult)}
        if head_bias_weight_decay is not None:
            bias_group["weight_decay"] = float(head_bias_weight_decay)
        groups.append(bias_group)
    return [g for g in groups if g["params"]]


def apply_lr_multipliers(optimizer: torch.optim.Optimizer) -> None:
    """``group["lr"] *= group["lr_mult"]`` for every group that has one; call once, before the scheduler."""
    for group in optimizer.param_groups:
        mult = group.get("lr_mult")
        if mult is not None and mult != 1.0:
            group["lr"] = group["lr"] * mult
