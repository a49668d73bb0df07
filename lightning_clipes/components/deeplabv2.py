"""DeepLab v2 (Chen et al., TPAMI 2017) on an smp encoder: the student architecture of CLIP-ES.

CLIP-ES trains its student with kazuto1011/deeplab-pytorch's ``DeepLabV2_ResNet101_MSC``: a ResNet-101
whose last two stages are dilated (output stride 8), followed by an ASPP of four parallel 3x3
convolutions with dilation 6, 12, 18 and 24 that go *straight to class logits* and are summed (no
BatchNorm, no 1x1 projection, no image pooling: that is DeepLab v3's ASPP). BatchNorm is frozen for
the whole training (running statistics and affine parameters stay as initialised), because a batch
of 10 crops of 321 px is too small to estimate them. The ``MSC`` wrapper's multi-scale-input training is
the student's ``msc_scales`` (:func:`~lightning_clipes.components.losses.multi_scale_inputs_loss`).

    net = DeepLabV2("resnet101", "imagenet", num_classes=21)  # smp's ResNet-101, dilated to stride 8
    logits = net(x)          # (B, 21, ceil(H/8), ceil(W/8)) for normalised (B, 3, H, W) images

Differences from deeplab-pytorch's network, kept because they come with smp's encoders:

* smp's (torchvision's) ResNet puts the stride of a downsampling block in its 3x3 convolution
  ("ResNet v1.5"); the Caffe ResNet-101 of DeepLab puts it in the first 1x1 convolution, and its stem's
  max-pool uses ``ceil_mode=True``. A 321 px crop still gives a 41 x 41 map in both. The Caffe weights
  (deeplab-pytorch's ``deeplabv1_resnet101-coco.pth``) therefore do not load into this network.
* the ImageNet weights are smp's torchvision ones, RGB in [0, 1] with ImageNet mean/std, not Caffe's BGR.
"""
from __future__ import annotations

from typing import Optional, Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DEEPLABV2_RATES = (6, 12, 18, 24)


class ASPPv2(nn.Module):
    """DeepLab v2's atrous spatial pyramid pooling: ``sum_r conv3x3_dilation_r(x)``, each to class logits.

    Args:
        in_channels: channels of the encoder's last feature map (2048 for ResNet-101, 512 for ResNet-18).
        num_classes: output channels.
        rates: one branch per dilation rate; padding = rate, so every branch keeps the spatial size.
    Branch ``i`` is the attribute ``c<i>`` (deeplab-pytorch's names): weights N(0, 0.01), biases 0.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = DEEPLABV2_RATES) -> None:
        super().__init__()
        if not rates or any(int(r) < 1 for r in rates):
            raise ValueError(f"ASPP rates must be a non-empty list of dilations >= 1, got {list(rates)}.")
        self.rates = tuple(int(r) for r in rates)
        for i, rate in enumerate(self.rates):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> (B, num_classes, h, w) summed logits of the branches."""
        return sum(branch(features) for branch in self.children())


def freeze_batchnorm(module: nn.Module) -> list[nn.Module]:
    """Put every BatchNorm layer under ``module`` in eval mode and stop gradients to its affine parameters.

    Returns the frozen layers. Eval mode alone is not enough to keep them in place: their weight and
    bias would still be trained, so they also get ``requires_grad = False`` (and the student leaves
    parameters without gradients out of the optimizer).
    """
    frozen = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    for bn in frozen:
        bn.eval()
        for p in bn.parameters():
            p.requires_grad_(False)
    return frozen


class DeepLabV2(nn.Module):
    """Dilated smp encoder + :class:`ASPPv2`; logits at the encoder's output stride.

    Args:
        encoder_name: an smp encoder that can be dilated (``resnet101`` for the paper; ``resnet18`` for tests).
        encoder_weights: ``imagenet`` (downloaded by smp on first use) or ``None`` for random weights.
        num_classes: classes with background (21 for VOC).
        rates: the ASPP dilations, DeepLab v2's (6, 12, 18, 24) by default.
        output_stride: 8 (the paper; ResNet layer3 dilated by 2, layer4 by 4) or 16 (layer4 by 2).
        freeze_bn: keep every BatchNorm of the encoder in eval mode with frozen parameters, also after
            ``.train()`` (deeplab-pytorch's ``freeze_bn``).
    Attributes:
        encoder, aspp: the two parts; the student's "head" (its 10x learning rate) is everything
            outside ``encoder``, here ``aspp``.
        input_multiple: the size inputs should be padded to (the output stride: a 321 px crop pads to
            328 = 41 x 8, so that upsampled logits line up with the pixels), read by ``PaddedSegmenter``.
    """

    def __init__(
        self,
        encoder_name: str = "resnet101",
        encoder_weights: Optional[str] = "imagenet",
        num_classes: int = 21,
        rates: Sequence[int] = DEEPLABV2_RATES,
        output_stride: int = 8,
        freeze_bn: bool = True,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabV2 needs output_stride 8 (the paper) or 16, got {output_stride}.")
        self.encoder = smp.encoders.get_encoder(
            encoder_name, in_channels=3, depth=5, weights=encoder_weights, output_stride=output_stride
        )
        self.aspp = ASPPv2(self.encoder.out_channels[-1], num_classes, rates)
        self.output_stride = output_stride
        self.input_multiple = output_stride
        self.freeze_bn = freeze_bn
        if freeze_bn:
            freeze_batchnorm(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes, ceil(H / s), ceil(W / s)) logits for ResNets at
        output stride s (321 -> 41 at s = 8)."""
        return self.aspp(self.encoder(x)[-1])

    def train(self, mode: bool = True) -> "DeepLabV2":
        """As ``nn.Module.train``, except that frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.encoder.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
