"""DeepLabV2, the paper's student: output stride 8, dilated ResNet stages, the ASPP of DeepLab v2, frozen
BatchNorm during training, and deeplab-pytorch's parameter groups (1x / 10x / 20x without weight decay)
under the poly schedule, from experiments/voc_deeplabv2.yaml.

Expected numbers are worked out by hand from the definitions (conv arithmetic, dilation offsets, the YAML's
LRs), not read back from the code. ResNet-18 where the forward pass would be slow; nothing downloaded.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from lightning_clipes.components.deeplabv2 import ASPPv2, DeepLabV2
from lightning_clipes.components.losses import confidence_guided_loss, multi_scale_inputs_loss
from lightning_clipes.components.student_factory import available_architectures, create_student
from lightning_clipes.student import SegmentationStudent

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "voc_deeplabv2.yaml"


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, **kw)


def student_from_config(**overrides) -> SegmentationStudent:
    """The model block of experiments/voc_deeplabv2.yaml through jsonargparse, on a random ResNet-18."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationStudent, "model")
    block = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    block.update(encoder_name="resnet18", encoder_weights=None, num_classes=3, **overrides)
    torch.manual_seed(0)
    return parser.instantiate(parser.parse_object({"model": block})).model


def random_crops(n: int = 4, size: int = 33) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, size, size, generator=g), "mask": torch.randint(0, 3, (size, size), generator=g)}
            for _ in range(n)]


# ------------------------------------------------------------------------------ architecture
def test_registered_and_output_stride_8_on_resnet101():
    assert "deeplabv2" in available_architectures()
    net = create_student("DeepLabV2", "resnet101", None, 21).eval()
    seen = []
    net.encoder.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[-1].shape))
    with torch.no_grad():
        logits = net(torch.rand(1, 3, 321, 321))
    (features,) = seen
    # 321 -> conv1 /2 -> 161 -> max-pool /2 -> 81 -> layer2 /2 -> 41; layer3, layer4 dilated instead of strided
    assert features == (1, 2048, 41, 41)
    assert logits.shape == (1, 21, 41, 41)


@pytest.mark.parametrize("encoder, three_by_three", [("resnet101", ["conv2"]), ("resnet18", ["conv1", "conv2"])])
def test_encoder_stages_dilated_2_and_4(encoder, three_by_three):
    net = DeepLabV2(encoder, None, 21)
    for stage, dilation in (("layer1", 1), ("layer2", 1), ("layer3", 2), ("layer4", 4)):
        for i, block in enumerate(getattr(net.encoder, stage)):
            for name in three_by_three:
                conv = getattr(block, name)
                strided = stage == "layer2" and i == 0 and name == three_by_three[0]  # the one stride left at /8
                assert conv.dilation == (dilation, dilation), f"{stage}[{i}].{name}"
                assert conv.padding == (dilation, dilation), f"{stage}[{i}].{name} keeps the size"
                assert conv.stride == ((2, 2) if strided else (1, 1)), f"{stage}[{i}].{name}"
    assert net.encoder.layer3[0].downsample[0].stride == (1, 1) and net.encoder.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():  # ResNet-18 too: 321 -> 41 (the config test runs DeepLabV2 on resnet18)
        assert net.eval()(torch.rand(1, 3, 321, 321)).shape == (1, 21, 41, 41)


def test_aspp_four_dilated_branches_to_logits_summed():
    aspp = DeepLabV2("resnet101", None, 21).aspp
    branches = list(aspp.children())
    assert [b.dilation for b in branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(b.kernel_size == (3, 3) and b.padding == b.dilation and b.in_channels == 2048 and b.out_channels == 21
               and b.bias is not None for b in branches)
    assert all(torch.equal(b.bias, torch.zeros(21)) for b in branches)  # deeplab-pytorch's init: N(0, 0.01), bias 0
    assert 0.008 < torch.cat([b.weight.flatten() for b in branches]).std().item() < 0.012

    # Impulse response: all-ones 3x3 kernels, one lit pixel at the centre of a 61 x 61 map. Branch r lights the
    # 9 pixels centre + (dy, dx) * r, dy, dx in {-1, 0, 1}; the centre is lit by all four branches.
    small = ASPPv2(1, 1, rates=(6, 12, 18, 24))
    with torch.no_grad():
        for b in small.children():
            b.weight.fill_(1.0)
            b.bias.zero_()
        impulse = torch.zeros(1, 1, 61, 61)
        impulse[0, 0, 30, 30] = 1.0
        out = small(impulse)[0, 0]
    expected = torch.zeros(61, 61)
    for r in (6, 12, 18, 24):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                expected[30 + dy * r, 30 + dx * r] += 1.0
    assert expected[30, 30] == 4.0 and int((expected > 0).sum()) == 33
    torch.testing.assert_close(out, expected)


def test_padded_to_the_stride_not_to_32():
    model = SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None).eval()
    assert model.model.multiple == 8  # 321 pads to 328 = 41 x 8, not to 352
    with torch.no_grad():
        assert model(torch.rand(1, 3, 321, 321)).shape == (1, 3, 321, 321)


def test_config_trainer_is_trainer_default_on_one_gpu():
    """voc_deeplabv2.yaml copies trainer_default.yaml (a YAML cannot include it and change one key): no drift."""
    own = yaml.safe_load(CONFIG.read_text())["trainer"]
    shared = yaml.safe_load((CONFIG.parent / "trainer_default.yaml").read_text())
    assert own.pop("devices") == 1
    shared.pop("devices")
    assert own == shared


# ------------------------------------------------------------------------------ training
def test_batchnorm_frozen_during_training_steps(tmp_path):
    model = student_from_config()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 20  # ResNet-18: stem + 8 blocks x 2 + 3 shortcuts
    stats = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.clone()) for bn in bns]
    conv1 = model.model.net.encoder.conv1.weight.detach().clone()
    seen = []

    class Check(L.Callback):
        def on_after_backward(self, trainer, module):
            seen.append(all(not bn.training for bn in bns) and module.model.net.aspp.c0.training)
            assert all(p.grad is None for bn in bns for p in bn.parameters())

    t = trainer(tmp_path, max_steps=3, callbacks=[Check()])
    t.fit(model, DataLoader(random_crops(), batch_size=2))
    assert seen == [True, True, True]
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for bn in bns for p in bn.parameters()}
    for bn, (mean, var, weight) in zip(bns, stats):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var) and torch.equal(bn.weight, weight)
    assert not torch.equal(model.model.net.encoder.conv1.weight, conv1)  # the convolutions do train


def test_deeplab_parameter_groups_and_poly_schedule(tmp_path):
    model = student_from_config()
    lrs: list[list[float]] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    t = trainer(tmp_path, max_steps=4, callbacks=[RecordLR()])
    t.fit(model, DataLoader(random_crops(8), batch_size=2))
    opt = t.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["backbone", "head", "head_bias"]
    assert [groups[n]["weight_decay"] for n in groups] == [5e-4, 5e-4, 0.0]
    net = model.model.net
    aspp = [net.aspp.c0, net.aspp.c1, net.aspp.c2, net.aspp.c3]
    assert {id(p) for p in groups["head"]["params"]} == {id(c.weight) for c in aspp}
    assert {id(p) for p in groups["head_bias"]["params"]} == {id(c.bias) for c in aspp}
    convs = [m.weight for m in net.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and {id(p) for p in groups["backbone"]["params"]} == {id(w) for w in convs}

    base = [2e-4, 2e-3, 4e-3]  # 1x, 10x, 20x of the authors' LR (method.md §6, ImageNet init)
    assert lrs[0] == pytest.approx(base, rel=1e-12)
    for k, step_lrs in enumerate(lrs):
        assert step_lrs == pytest.approx([b * (1 - k / 4) ** 0.9 for b in base], rel=1e-9)
    assert len(lrs) == 4


def test_msc_training_from_the_config(monkeypatch):
    model = student_from_config()
    assert model.msc_scales == [0.5, 0.75]  # deeplab-pytorch's DeepLabV2_ResNet101_MSC
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    model.train()
    batch = next(iter(DataLoader(random_crops(2), batch_size=2)))
    loss = model.training_step(batch, 0)
    expected = multi_scale_inputs_loss(model.model, batch["image"], batch["mask"], [0.5, 0.75])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    single = student_from_config(msc_scales=[])
    monkeypatch.setattr(single, "log", lambda *args, **kwargs: None)
    single.train()
    one = single.training_step(batch, 0)  # same seed, same weights: the crop alone
    assert one.item() == pytest.approx(confidence_guided_loss(single.model(batch["image"]), batch["mask"]).item())
    assert loss.item() > 2 * one.item()
    with pytest.raises(ValueError, match="msc_scales"):
        student_from_config(msc_scales=[-0.5])


# ------------------------------------------------------------------------------ warm start
def perturbed_student(num_classes: int = 3, arch: str = "DeepLabV2", seed: int = 1) -> SegmentationStudent:
    """A student whose every weight and BN statistic differs from a fresh one's, as after training."""
    torch.manual_seed(seed)
    model = SegmentationStudent(num_classes=num_classes, arch=arch, encoder_name="resnet18", encoder_weights=None)
    with torch.no_grad():
        for name, tensor in model.model.net.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn_like(tensor))
                if "running_var" in name:
                    tensor.abs_()
    return model.eval()


def test_init_checkpoint_round_trip(tmp_path):
    source = perturbed_student()
    t = trainer(tmp_path)
    t.strategy.connect(source)
    t.save_checkpoint(tmp_path / "source.ckpt")  # a Lightning checkpoint: keys model.net.*
    torch.save(source.model.net.state_dict(), tmp_path / "net.pt")  # a bare state dict
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        expected = source(x)
        for path in (tmp_path / "source.ckpt", tmp_path / "net.pt"):
            torch.manual_seed(5)  # another random start, overwritten by the checkpoint
            warm = SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                                       init_checkpoint=str(path)).eval()
            assert torch.equal(warm(x), expected)
    # the path is not a hyper-parameter: a checkpoint of the warm-started run loads without that file
    t = trainer(tmp_path)
    t.strategy.connect(warm)
    t.save_checkpoint(tmp_path / "warm.ckpt")
    (tmp_path / "source.ckpt").unlink()
    (tmp_path / "net.pt").unlink()
    restored = SegmentationStudent.load_from_checkpoint(tmp_path / "warm.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), expected)


def test_init_checkpoint_with_other_classes_needs_explicit_exclude(tmp_path):
    torch.save(perturbed_student(num_classes=5).model.net.state_dict(), tmp_path / "coco.pt")
    with pytest.raises(ValueError) as err:
        SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                            init_checkpoint=str(tmp_path / "coco.pt"))
    message = str(err.value)
    assert "8 keys of another shape" in message  # 4 ASPP weights + 4 biases
    assert "aspp.c0.weight (5, 512, 3, 3) vs (3, 512, 3, 3)" in message and "(5 more)" in message
    assert "--model.init_exclude '[aspp]'" in message and "missing" not in message

    source = torch.load(tmp_path / "coco.pt")
    torch.manual_seed(7)
    fresh = SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None)
    torch.manual_seed(7)
    warm = SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                               init_checkpoint=str(tmp_path / "coco.pt"), init_exclude=["aspp"])
    for name, tensor in warm.model.net.state_dict().items():
        expected = fresh.model.net.state_dict()[name] if name.startswith("aspp.") else source[name]
        assert torch.equal(tensor, expected), name


def test_init_checkpoint_of_another_architecture_is_a_short_error(tmp_path):
    torch.save(perturbed_student(arch="DeepLabV3Plus").model.net.state_dict(), tmp_path / "v3plus.pt")
    with pytest.raises(ValueError) as err:
        SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                            init_checkpoint=str(tmp_path / "v3plus.pt"))
    message = str(err.value)
    # the ResNet-18 encoders match; the 8 ASPP tensors are missing, the V3+ decoder and head unexpected
    v3plus = torch.load(tmp_path / "v3plus.pt")
    unexpected = [k for k in v3plus if not k.startswith("encoder.")]
    assert "8 keys missing from the checkpoint: aspp.c0.bias, aspp.c0.weight, aspp.c1.bias, aspp.c1.weight, … (4 more)" in message
    assert f"{len(unexpected)} unexpected keys in the checkpoint" in message and len(unexpected) > 20
    assert len(message) < 1000 and message.count("\n") <= 5
    assert "--model.arch" in message
    with pytest.raises(ValueError, match=r"no modules of the network; its top-level modules: \['aspp', 'encoder'\]"):
        SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                            init_checkpoint=str(tmp_path / "v3plus.pt"), init_exclude=["segmentation_head"])
    with pytest.raises(FileNotFoundError, match="init_checkpoint null"):
        SegmentationStudent(num_classes=3, arch="DeepLabV2", encoder_name="resnet18", encoder_weights=None,
                            init_checkpoint=str(tmp_path / "nothing.ckpt"))
