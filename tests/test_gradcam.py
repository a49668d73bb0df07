"""Softmax-GradCAM and the ViT token path against slow, literal computations (method §2-§3)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_clipes.components.clipes import CLIPES
from lightning_clipes.components.gradcam import softmax_gradcam
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, VOC_BACKGROUND, VOC_PROMPT_NAMES
from lightning_clipes.components.vit_tokens import (
    attention_with_weights,
    block_forward,
    embed,
    resized_pos_embed,
    run_frozen_blocks,
)


def literal_bilinear(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear, one output pixel at a time: (C, h, w) -> (C, out_h, out_w)."""
    c, h, w = src.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        y = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * src[:, y0, x0] + fx * src[:, y0, x1])
                            + fy * ((1 - fx) * src[:, y1, x0] + fx * src[:, y1, x1]))
    return out


def test_pos_embed_resize_is_literal_bilinear_and_keeps_cls(tiny_clip):
    visual = tiny_clip.model.visual
    pe = visual.positional_embedding.detach()
    got = resized_pos_embed(visual, (3, 7)).detach()
    assert torch.equal(got, got.half().float())  # rounded to float16 precision, as the reference
    torch.testing.assert_close(got[0], pe[0].half().float())
    grid = pe[1:].T.reshape(-1, 4, 4).numpy()
    expected = literal_bilinear(grid, 3, 7).reshape(grid.shape[0], -1).T
    np.testing.assert_allclose(got[1:].numpy(), expected, rtol=1e-3, atol=1e-4)  # float16 rounding
    torch.testing.assert_close(resized_pos_embed(visual, (4, 4)), pe.half().float())  # native grid


def test_embed_and_blocks_match_open_clip_at_native_size(tiny_clip):
    visual = tiny_clip.model.visual
    x = torch.randn(2, 3, 64, 64)
    ours = embed(visual, x)
    torch.testing.assert_close(ours, visual._embeds(x), rtol=1e-2, atol=1e-2)  # float16 pos-emb only
    ours = visual._embeds(x)  # the blocks are compared on identical input
    for block in visual.transformer.resblocks:
        ours_next, _ = block_forward(block, ours, need_attn=True)
        torch.testing.assert_close(ours_next, block(ours), rtol=1e-5, atol=1e-5)
        ours = ours_next


def test_block_attention_is_head_average_of_softmax_qk():
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(d_model=32, n_head=4).eval()
    x = torch.randn(2, 5, 32)
    _, attn = block_forward(block, x, need_attn=True)
    z = block.ln_1(x)
    q, k, _ = F.linear(z, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    q = q.view(2, 5, 4, 8).transpose(1, 2)
    k = k.view(2, 5, 4, 8).transpose(1, 2)
    expected = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).softmax(-1).mean(1)
    torch.testing.assert_close(attn, expected, rtol=1e-5, atol=1e-6)


def test_written_out_attention_equals_pytorchs():
    """The autocast path (heads averaged one at a time in float32) computes nn.MultiheadAttention's
    output and head-averaged weights; block_forward takes it only under autocast."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(1)
    block = ResidualAttentionBlock(d_model=48, n_head=6).eval()
    z = torch.randn(3, 7, 48)
    out, attn = attention_with_weights(block.attn, z)
    ref_out, ref_attn = block.attn(z, z, z, need_weights=True, average_attn_weights=True)
    assert attn.dtype == torch.float32 and attn.shape == (3, 7, 7)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, a = block_forward(block, x, need_attn=True)
    y32, a32 = block_forward(block, x, need_attn=True)
    assert a.dtype == torch.float32 and not torch.equal(a, a32)  # ran in bf16 ...
    torch.testing.assert_close(a, a32, rtol=0, atol=0.02)  # ... and differs by bf16 rounding only
    torch.testing.assert_close(y.float(), y32, rtol=0, atol=0.1)


def test_bf16_labelling_projects_all_tokens_in_one_matrix_product(tiny_clip):
    """No attention projection runs as T products of (B, D) tokens with the weight copied once per
    token (``matmul``'s broadcast path for a transposed input under bf16 autocast on CPU), which made
    the labelling pass 11x slower (benchmarks/labelling_pass.py)."""
    from torch.profiler import ProfilerActivity, profile

    clipes = CLIPES(tiny_clip, ["cat", "dog"], ["grass"], [CLIPES_TEMPLATE], affinity_layers=2, precision="bf16")
    images = torch.randn(2, 3, 48, 64)  # a 3x4 grid: 13 tokens
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        maps = clipes(list(images), [[0], [0, 1]], [(48, 64)] * 2)
    assert [m.cams.shape for m in maps] == [(1, 48, 64), (2, 48, 64)]
    bmm_inputs = [e.input_shapes[0] for e in prof.events() if e.name == "aten::bmm"]
    assert bmm_inputs, "the profiler saw no batched products: this test no longer looks where it should"
    assert not [s for s in bmm_inputs if s[:2] == [13, 2]], bmm_inputs


def test_gradcam_reduces_in_float32_under_bf16_autocast(tiny_clip):
    """Autocast runs the ViT in bf16, but the class scores and the map reduction stay float32: cams
    rounded to bf16's 8-bit mantissa flipped whole toy-world images (label agreement with float32,
    worst image: 28 % before, 68 % after; mean 99.2 % before, 99.85 % after)."""
    visual = tiny_clip.model.visual
    clipes = CLIPES(tiny_clip, ["cat", "dog"], ["grass"], [CLIPES_TEMPLATE], affinity_layers=1)
    tokens, _, grid = run_frozen_blocks(visual, torch.randn(2, 3, 48, 64), attn_from=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cams, attn = softmax_gradcam(visual, tiny_clip.model.logit_scale, tokens, grid, clipes.fg_text, clipes.bg_text,
                                     [[0], [0, 1]])
    assert cams.dtype == attn.dtype == torch.float32 and cams.shape == (3, 3, 4)
    assert not torch.equal(cams, cams.bfloat16().float())  # values off bf16's grid: not rounded to it


def literal_gradcam(clip_model, image, labels, fg, bg):
    """One backward per class with a hook on ln_1 of the last block, as pytorch-grad-cam does."""
    visual = clip_model.visual
    with torch.no_grad():
        x = embed(visual, image[None])
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    last = visual.transformer.resblocks[-1]
    cams = []
    for k_idx in range(len(labels)):
        seen = {}

        def hook(module, inputs, output):
            output.retain_grad()
            seen["z"] = output

        handle = last.ln_1.register_forward_hook(hook)
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            out = visual.ln_post(last(xin))
            feat = F.normalize(out[:, 1:].mean(1) @ visual.proj, dim=-1)
            text = F.normalize(torch.cat([fg[labels], bg]), dim=-1)
            probs = (clip_model.logit_scale.exp() * feat @ text.T).softmax(-1)
            probs[0, k_idx].backward()
        handle.remove()
        z, g = seen["z"][0, 1:].detach(), seen["z"].grad[0, 1:]
        weights = g.mean(0)
        cam = F.relu((z * weights).sum(-1))
        for _ in range(2):  # pytorch-grad-cam scales per layer, then again after averaging layers
            cam = cam - cam.min()
            cam = cam / (cam.max() + 1e-7)
        cams.append(cam)
    return torch.stack(cams)


@pytest.fixture(scope="module")
def clipes(tiny_clip):
    return CLIPES(tiny_clip, VOC_PROMPT_NAMES, VOC_BACKGROUND, [CLIPES_TEMPLATE], affinity_layers=3)


def test_batched_gradcam_equals_per_class_loop(clipes):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 48, 80)
    labels = [[3, 14, 7], [0]]
    visual = clipes.clip.visual
    tokens, _, grid = run_frozen_blocks(visual, images, attn_from=0)
    cams, _ = softmax_gradcam(visual, clipes.clip.logit_scale, tokens, grid, clipes.fg_text, clipes.bg_text, labels)
    assert cams.shape == (4, 3, 5)
    expected = torch.cat([
        literal_gradcam(clipes.clip, images[b], labels[b], clipes.fg_text, clipes.bg_text).view(-1, 3, 5)
        for b in range(2)
    ])
    torch.testing.assert_close(cams, expected, rtol=1e-4, atol=1e-5)
    assert cams.min() >= 0 and cams.max() <= 1


def test_absent_classes_are_not_in_the_softmax(clipes):
    """The cam of class 3 changes when another present class joins the text set."""
    torch.manual_seed(2)
    images = torch.randn(1, 3, 64, 96)
    visual = clipes.clip.visual
    tokens, _, grid = run_frozen_blocks(visual, images, attn_from=0)
    alone, _ = softmax_gradcam(visual, clipes.clip.logit_scale, tokens, grid, clipes.fg_text, clipes.bg_text, [[3]])
    with_other, _ = softmax_gradcam(visual, clipes.clip.logit_scale, tokens, grid, clipes.fg_text, clipes.bg_text, [[3, 5]])
    torch.testing.assert_close(alone[0], literal_gradcam(clipes.clip, images[0], [3], clipes.fg_text, clipes.bg_text)[0].view(4, 6), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], with_other[0])
