"""The whole CLIPES module: literal composition of §2-§4, batching, frozen state, odd sizes."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_clipes.components.affinity import box_mask
import lightning_clipes.components.clipes as clipes_module
from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, VOC_BACKGROUND, VOC_PROMPT_NAMES
from lightning_clipes.components.pseudo_mask import background_score, cams_to_label
from lightning_clipes.components.vit_tokens import padded_size, preprocess
from test_affinity import literal_sinkhorn
from test_gradcam import literal_gradcam


@pytest.fixture(scope="module")
def clipes(tiny_clip):
    return CLIPES(tiny_clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=2)


def literal_attention(clip_model, image):
    """Head-averaged attention of every block, block by block with open_clip's own modules."""
    visual = clip_model.visual
    from lightning_clipes.components.vit_tokens import embed

    maps = []
    with torch.no_grad():
        x = embed(visual, image[None])
        for block in visual.transformer.resblocks:
            z = block.ln_1(x)
            maps.append(block.attn(z, z, z, need_weights=True)[1][0, 1:, 1:])
            x = block(x)
    return maps


def literal_clipes(clipes, image_u8, labels):
    """§2-§4 written out per class with numpy loops where it matters."""
    x = clipes.preprocess(image_u8)
    h, w = x.shape[1] // 16, x.shape[2] // 16
    cams = literal_gradcam(clipes.clip, x, labels, clipes.fg_text, clipes.bg_text).view(-1, h, w)
    attn = torch.stack(literal_attention(clipes.clip, x)[-clipes.affinity_layers:]).mean(0)
    s = torch.from_numpy(literal_sinkhorn(attn.numpy())).float()
    out = []
    for cam in cams:
        box = torch.from_numpy(box_mask(cam.numpy(), 0.4)).view(1, -1).float()
        r = ((s * box) @ cam.reshape(-1, 1)).reshape(h, w)
        r = r - r.min()
        out.append(r / (r.max() + 1e-7))
    size = image_u8.shape[:2]
    return F.interpolate(torch.stack(out)[None], size=size, mode="bilinear", align_corners=False)[0]


def test_forward_matches_literal_composition(clipes):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    (maps,) = clipes([clipes.preprocess(image)], [[11, 2]], [(70, 90)])
    assert maps.keys.tolist() == [11, 2] and maps.cams.shape == (2, 70, 90)
    torch.testing.assert_close(maps.cams, literal_clipes(clipes, image, [11, 2]), rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("per_call", [1, 5])  # 1: a CPU's default; 5: every same-size image at once, as on a GPU
def test_batch_of_mixed_sizes_equals_one_by_one(clipes, per_call, monkeypatch):
    monkeypatch.setattr(clipes_module, "CPU_BATCH", per_call)
    rng = np.random.default_rng(1)
    shapes = [(40, 60), (17, 33), (40, 60), (1, 1), (16, 16)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    labels = [[0, 5], [7], [14, 1, 2], [3], [19]]
    batch = clipes([clipes.preprocess(i) for i in images], labels, shapes)
    for img, lab, shape, got in zip(images, labels, shapes, batch):
        (single,) = clipes([clipes.preprocess(img)], [lab], [shape])
        assert got.cams.shape == (len(lab), *shape)
        torch.testing.assert_close(got.cams, single.cams, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.cams_raw, single.cams_raw, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(got.cams).all() and got.cams.min() >= 0 and got.cams.max() <= 1


def test_call_changes_no_module_state_and_no_gradients(clipes):
    before = {k: v.clone() for k, v in clipes.state_dict().items()}
    attrs = set(vars(clipes.clip.visual))
    image = np.full((50, 30, 3), 120, np.uint8)
    clipes([clipes.preprocess(image)], [[4]], [(50, 30)])
    after = clipes.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(vars(clipes.clip.visual)) == attrs
    assert all(p.grad is None and not p.requires_grad for p in clipes.parameters())
    clipes.train()
    assert not clipes.clip.training


def test_bf16_runs_a_copy_with_cast_weights_that_computes_what_autocast_computes(tiny_clip, monkeypatch):
    """The low-precision copy only saves autocast's per-call casts: same maps to the bit, CLIP untouched."""
    clipes = CLIPES(tiny_clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=2, precision="bf16")
    keys = set(clipes.state_dict())
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with torch.inference_mode():  # as Lightning predicts: the copy must still carry the backward
        (cached,) = clipes([clipes.preprocess(image)], [[3, 8]], [(40, 60)])
    copy = clipes._lowp_visual[1]
    assert copy is not clipes.clip.visual and set(clipes.state_dict()) == keys
    assert copy.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert copy.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert copy.transformer.resblocks[0].attn.in_proj_bias.dtype == torch.float32  # keeps MHA off its fast path
    assert all(p.dtype == torch.float32 for p in clipes.clip.parameters())
    monkeypatch.setattr(CLIPES, "_visual", lambda self, dtype: self.clip.visual)  # autocast casting every call
    (uncached,) = clipes([clipes.preprocess(image)], [[3, 8]], [(40, 60)])
    assert torch.equal(cached.cams, uncached.cams) and torch.equal(cached.cams_raw, uncached.cams_raw)


def test_low_precision_copy_follows_changed_weights(tiny_openai_ckpt):
    from lightning_clipes.components.clip_loader import load_clip

    clipes = CLIPES(load_clip(pretrained=str(tiny_openai_ckpt)), VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE],
                    affinity_layers=2, precision="bf16")
    image = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    x = clipes.preprocess(image)
    (before,) = clipes([x], [[1, 4]], [(32, 48)])
    with torch.no_grad():
        clipes.clip.visual.conv1.weight.mul_(-1.5)  # e.g. load_state_dict copying new weights in place
    (after,) = clipes([x], [[1, 4]], [(32, 48)])
    fresh = CLIPES(load_clip(pretrained=str(tiny_openai_ckpt)), VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE],
                   affinity_layers=2, precision="bf16")
    with torch.no_grad():
        fresh.clip.visual.conv1.weight.mul_(-1.5)
    (expected,) = fresh([x], [[1, 4]], [(32, 48)])
    assert not torch.equal(before.cams_raw, after.cams_raw)
    assert torch.equal(after.cams_raw, expected.cams_raw)


def test_works_under_inference_mode(clipes):
    image = np.full((20, 20, 3), 50, np.uint8)
    with torch.inference_mode():
        x = clipes.preprocess(image)
        (maps,) = clipes([x], [[0]], [(20, 20)])
    assert maps.cams.shape == (1, 20, 20)


def test_bad_labels_are_refused(clipes):
    x = clipes.preprocess(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no labels"):
        clipes([x], [[]], [(16, 16)])
    with pytest.raises(ValueError, match="distinct indices"):
        clipes([x], [[25]], [(16, 16)])


def test_preprocess_resizes_to_patch_multiple_with_pil_bicubic():
    from PIL import Image

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (21, 35, 3), dtype=np.uint8)
    assert padded_size(21, 35, (16, 16)) == (32, 48)
    x = preprocess(image, (16, 16), (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    pil = np.asarray(Image.fromarray(image).resize((48, 32), Image.BICUBIC), dtype=np.float32) / 255
    expected = (pil - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.5, 1.0])
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_background_score_and_labels_by_hand():
    cams = torch.tensor([[[0.9, 0.2], [0.1, 0.0]], [[0.3, 0.6], [0.05, 0.0]]])
    keys = torch.tensor([14, 2])
    torch.testing.assert_close(background_score(cams, 1.0), torch.tensor([[0.1, 0.4], [0.9, 1.0]]))
    torch.testing.assert_close(background_score(cams, 2.0), torch.tensor([[0.01, 0.16], [0.81, 1.0]]))
    assert cams_to_label(cams, keys, 1.0).tolist() == [[15, 3], [0, 0]]


def test_logit_scale_replaces_the_clips_own_in_the_softmax(tiny_clip, clipes):
    """A CLIPES run cooler equals, literally, the same CLIP with that scale written into its weights."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cooled = CLIPES(tiny_clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=2, logit_scale=2.0)
    twin = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        twin.model.logit_scale.fill_(math.log(2.0))
    twin_clipes = CLIPES(twin, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=2)
    (got,) = cooled([cooled.preprocess(image)], [[4, 9]], [(48, 64)])
    torch.testing.assert_close(got.cams, literal_clipes(twin_clipes, image, [4, 9]), rtol=1e-3, atol=2e-4)
    (own,) = clipes([clipes.preprocess(image)], [[4, 9]], [(48, 64)])
    assert float(tiny_clip.model.logit_scale.exp()) != pytest.approx(2.0)
    assert not torch.allclose(got.cams, own.cams, atol=1e-3)  # the CLIP's own scale gives other maps
    with pytest.raises(ValueError, match="logit_scale"):
        CLIPES(tiny_clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=2, logit_scale=0.0)
