"""Vocabularies, text features and CLIP loading from every supported source."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_clip_state_dict
from lightning_clipes.components.clip_loader import load_clip, register_clip_config
from lightning_clipes.components.prompts import (
    COCO_BACKGROUND,
    COCO_PROMPT_NAMES,
    VOC_BACKGROUND,
    VOC_PROMPT_NAMES,
    check_templates,
    create_background,
    create_vocabulary,
    encode_prompts,
)


def test_builtin_vocabularies_have_the_published_sizes():
    assert len(VOC_PROMPT_NAMES) == 20 and len(VOC_BACKGROUND) == 25
    assert len(COCO_PROMPT_NAMES) == 80 and len(COCO_BACKGROUND) == 23
    assert VOC_PROMPT_NAMES[14] == "person with clothes,people,human"
    assert set(VOC_BACKGROUND) - set(COCO_BACKGROUND) == {"keyboard", "sign"}
    assert create_vocabulary("coco")[25] == "umbrella,parasol"
    assert create_vocabulary("toy")[0] == "boat" and create_background("toy")[0] == "water"  # the toy world's words


def test_vocabulary_errors_tell_what_to_do():
    with pytest.raises(ValueError, match=r"\['coco', 'toy', 'voc'\]"):
        create_vocabulary("cityscapes")
    with pytest.raises(ValueError, match="duplicate"):
        create_vocabulary(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="empty"):
        create_vocabulary(["cat", " "])
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["a photo of a cat."])
    assert create_background("none") == []
    assert create_vocabulary(["traffic cone", "forklift,lift truck"]) == ["traffic cone", "forklift,lift truck"]


def test_text_features_normalise_each_template_then_average(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    templates = ["a clean origami {}.", "a photo of a {}."]
    got = encode_prompts(model, tok, ["cat", "bird avian"], templates)
    for i, name in enumerate(["cat", "bird avian"]):
        with torch.no_grad():
            each = [F.normalize(model.encode_text(tok([t.format(name)]))[0], dim=-1) for t in templates]
        expected = F.normalize((each[0] + each[1]) / 2, dim=-1)
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)


def test_text_tower_skips_the_padding_unless_asked_for_the_full_context(tiny_clip):
    """Causal attention + end-of-text pooling: the tokens after the longest sentence's end change
    nothing, so they are not run, and the names share one call (the reference's 77 tokens and one call
    per name only with full_context, for parity)."""
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    lengths = []
    hook = model.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    try:
        names, templates = ["cat", "bird avian"], ["a clean origami {}."]
        trimmed = encode_prompts(model, tok, names, templates)
        full = encode_prompts(model, tok, names, templates, full_context=True)
    finally:
        hook.remove()
    # all sentences in one call, cut after the longest (+ start and end tokens); the parity path: one call per name
    assert lengths == [max(len(tok.encode(t.format(n))) + 2 for t in templates for n in names), 77, 77]
    assert lengths[0] == 8
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    from lightning_clipes.components.clipes import CLIPES

    for reference_order, expected in ((False, trimmed), (True, full)):  # the parity path runs all 77
        clipes = CLIPES(tiny_clip, names, [], templates, affinity_layers=1, reference_order=reference_order)
        assert torch.equal(clipes.fg_text, expected)


def test_openai_state_dict_loads_with_quick_gelu_and_fp16_rounded_weights(tiny_openai_ckpt):
    clip = load_clip("ViT-B-16", str(tiny_openai_ckpt))
    sd = tiny_clip_state_dict()
    w = clip.model.visual.transformer.resblocks[0].mlp.c_fc.weight
    torch.testing.assert_close(w, sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].half().float())
    assert type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert clip.model.visual.conv1.kernel_size == (16, 16) and len(clip.model.visual.transformer.resblocks) == 3
    assert not any(p.requires_grad for p in clip.model.parameters()) and not clip.model.training
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_torchscript_archive_loads_like_its_state_dict(tmp_path, tiny_openai_ckpt):
    """OpenAI ships ViT-B-16.pt as a TorchScript archive; a scripted tiny CLIP stands in for it."""
    from open_clip.model import CLIP

    model = CLIP(**_tiny_cfg(), quick_gelu=True)
    model.load_state_dict(tiny_clip_state_dict())
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)
    a = load_clip("ViT-B-16", str(path)).model.state_dict()
    b = load_clip("ViT-B-16", str(tiny_openai_ckpt)).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_cfg():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return dict(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=3, width=64, patch_size=16, image_size=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    )


def test_open_clip_checkpoint_and_registered_config(tmp_path):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    register_clip_config("test-micro-ViT", cfg)
    random = load_clip("test-micro-ViT", None)
    path = tmp_path / "openclip.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in random.model.state_dict().items()}}, path)
    loaded = load_clip("test-micro-ViT", str(path))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in random.model.state_dict().items())
    assert type(loaded.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"


def test_missing_weights_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ViT-B-16.pt.*--model.pretrained.*--data.labeler.init_args.pretrained"):
        load_clip("ViT-B-16", str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_clip("ViT-B-16", "not-a-tag")
    with pytest.raises(ValueError, match="Unknown open_clip model name"):
        load_clip("ViT-Q-99", "openai")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read CLIP weights .*garbage.pt: it is not a PyTorch checkpoint") as err:
        load_clip("ViT-B-16", str(garbage))
    assert "weights_only=False" not in str(err.value)


def test_shipped_weights_are_found_by_model_name_or_named_in_the_error():
    clip = load_clip("clipes-toy-ViT", "shipped")
    assert float(clip.model.logit_scale.exp()) > 1 and clip.model.visual.conv1.weight.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match=r"ships no weights for 'ViT-B-16' \(it has: clipes-toy-ViT\)"):
        load_clip("ViT-B-16", "shipped")


def test_a_pickled_object_is_refused_without_advice_to_unpickle_it(tmp_path):
    import argparse

    path = tmp_path / "whole-model.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.zeros(2)}, path)  # a pickled object, not only tensors
    with pytest.raises(ValueError, match=r"pickled Python objects besides tensors.*torch.save\(model.state_dict\(\)") as err:
        load_clip("ViT-B-16", str(path))
    assert "weights_only=False" not in str(err.value)


def test_non_vit_towers_are_refused():
    with pytest.raises(ValueError, match="ViT image tower"):
        load_clip("RN50", None)


class _RecordCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_loading_weights_skips_the_random_initialisation_they_replace(tmp_path, tiny_openai_ckpt, caplog):
    """Weights that are loaded are not first drawn at random (ViT-B/16: 1.1 s of start-up) nor said to be, and
    the model is the one open_clip builds with its initialisation: every weight and buffer (the causal mask) the same."""
    from open_clip.model import build_model_from_openai_state_dict

    init = {getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "constant_", "xavier_uniform_")}
    register_clip_config("test-init-ViT", {"embed_dim": 16, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                         "heads": 2, "layers": 1}, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}})
    torch.save(load_clip("test-init-ViT", None).model.state_dict(), tmp_path / "openclip.pt")
    seen, said = {}, {}
    for name, pretrained in (("ViT-B-16", str(tiny_openai_ckpt)), ("test-init-ViT", str(tmp_path / "openclip.pt")),
                             ("clipes-toy-ViT", "shipped"), ("test-init-ViT", None)):
        caplog.clear()
        with _RecordCalls() as record, caplog.at_level("WARNING"):
            load_clip(name, pretrained)
        seen[pretrained] = [f for f in record.calls if f in init]
        said[pretrained] = "initialized randomly" in caplog.text
    assert seen[None] and said[None], "random weights must still be drawn, and open_clip says so"
    assert not any(seen[p] or said[p] for p in seen if p is not None), (seen, said)

    loaded = load_clip("ViT-B-16", str(tiny_openai_ckpt)).model
    built = build_model_from_openai_state_dict(tiny_clip_state_dict(), quick_gelu=True).float()
    a, b = dict(loaded.named_buffers()) | loaded.state_dict(), dict(built.named_buffers()) | built.state_dict()
    assert a.keys() == b.keys() and "attn_mask" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_building_the_clip_leaves_the_seeded_random_stream_alone(tiny_openai_ckpt):
    """A run is seeded once; the labeler's CLIP, built before the student, must not shift what the student draws
    (whatever its loading draws or skips), and random weights still come from the seed."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    for pretrained in (str(tiny_openai_ckpt), "shipped", None):
        torch.manual_seed(0)
        first = load_clip("clipes-toy-ViT" if pretrained == "shipped" else "ViT-B-16", pretrained).model
        assert torch.equal(torch.rand(4), expected), pretrained
    torch.manual_seed(0)
    second = load_clip("ViT-B-16", None).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_many_templates_go_through_the_text_tower_in_bounded_calls(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    names, templates = ["cat", "bird avian"], [f"photo {i} of a {{}}." for i in range(600)]
    batches = []
    hook = model.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, i, o: batches.append(o.shape[0]))
    try:
        chunked = encode_prompts(model, tok, names, templates)
    finally:
        hook.remove()
    assert batches == [1024, 176]
    one_per_name = encode_prompts(model, tok, names, templates, full_context=True)
    torch.testing.assert_close(chunked, one_per_name, rtol=0, atol=1e-5)
