"""The toy CLIP: training steps lower the loss, exported weights round-trip through load_clip, the
training stream's captions, co-occurrence and crops."""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pytest
import torch

from lightning_clipes.cli import cli_main
from lightning_clipes.components.clip_loader import expand_compact_state_dict, load_clip, register_clip_config
from lightning_clipes.components.provenance import training_environment
from lightning_clipes.data.toy_scenes import TOY_BACKGROUNDS, TOY_CLASSES
from lightning_clipes.data.toy_captions import (
    FIRST_CLIP_INDEX, TOY_CLIP_NAME, TOY_TEMPLATE, ToyCaptionDataModule, caption, world_token_ids,
)
from lightning_clipes.toy_clip import ToyCLIP, encode_image_tokens

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "toy_clip.yaml"
TINY = "toy-test-ViT"
register_clip_config(TINY, {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
})

TINY_CLS = "toy-test-cls-ViT"
register_clip_config(TINY_CLS, {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "pool_type": "tok"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
})


def slice_loss(module: ToyCLIP, dm: ToyCaptionDataModule) -> float:
    images, tokens, _ = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        img, txt = module.features(images, tokens)
        return float(module.loss(img, txt, module.clip.logit_scale.exp()))


def trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP fitted for 12 steps on one batch of 16 scenes, exported."""
    tmp = tmp_path_factory.mktemp("toy_clip")
    L.seed_everything(0)
    dm = ToyCaptionDataModule(image_size=64, num_samples=16, val_samples=16, batch_size=16, model_name=TINY)
    dm.setup("fit")
    module = ToyCLIP(model_name=TINY, lr=3e-3, warmup_steps=1, export_path=str(tmp / "tiny.pt"))
    before = slice_loss(module, dm)
    trainer(tmp, 12).fit(module, datamodule=dm)
    return module, dm, before, tmp / "tiny.pt"


def test_captions_use_the_world_vocabulary():
    rng = np.random.default_rng(0)
    text = caption(["boat", "fish", "kite"], "water", rng, p_background=1.0)
    assert text.startswith("a photo of a ") and text.endswith(" on water.") and text.count(" and ") == 1
    assert caption(["car"], "road", rng, p_background=0.0) == "a photo of a car."
    tokenizer = ToyCLIP(model_name=TINY).tokenizer
    allowed = set(world_token_ids(tokenizer).tolist()) | {0}
    for i in range(20):
        names = [TOY_CLASSES[j] for j in rng.choice(10, size=1 + i % 3, replace=False)]
        assert set(tokenizer([caption(names, TOY_BACKGROUNDS[i % 6], rng)])[0].tolist()) <= allowed
    for word in [*TOY_CLASSES, *TOY_BACKGROUNDS]:
        assert set(tokenizer([TOY_TEMPLATE.format(word)])[0].tolist()) <= allowed


def test_image_encoder_matches_open_clip_and_takes_other_sizes():
    module = ToyCLIP(model_name=TINY)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(encode_image_tokens(module.clip.visual, x), module.clip.encode_image(x), atol=1e-5)
    assert encode_image_tokens(module.clip.visual, torch.randn(1, 3, 48, 80)).shape == (1, 32)
    assert encode_image_tokens(module.clip.visual, x, keep=0.5).shape == (2, 32)
    cls_pooled = ToyCLIP(model_name=TINY_CLS)  # the shipped config's pooling: the class token
    assert torch.allclose(encode_image_tokens(cls_pooled.clip.visual, x), cls_pooled.clip.encode_image(x), atol=1e-5)


def test_class_token_blocks_cut_the_class_token_off_the_patches_until_the_last_blocks():
    """The masked forward equals running the patch tokens and the class token as separate
    sequences through the early blocks and together through the last one."""
    torch.manual_seed(0)
    visual = ToyCLIP(model_name=TINY_CLS).clip.visual
    x = torch.randn(2, 3, 64, 64)
    patches = visual.conv1(x).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
    cls = (visual.class_embedding + visual.positional_embedding[0]).expand(2, 1, -1)
    tokens = visual.ln_pre(torch.cat([cls, patches], dim=1))
    first, last = visual.transformer.resblocks
    cls_alone, patches_alone = first(tokens[:, :1]), first(tokens[:, 1:])
    expected = visual.ln_post(last(torch.cat([cls_alone, patches_alone], dim=1)))[:, 0] @ visual.proj
    with torch.no_grad():
        got = encode_image_tokens(visual, x, class_token_blocks=1)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, visual(x), atol=1e-3)  # the mask does change the feature
        assert torch.allclose(encode_image_tokens(visual, x, class_token_blocks=2), visual(x), atol=1e-5)
    with pytest.raises(ValueError, match="class_token_blocks"):
        ToyCLIP(model_name=TINY_CLS, class_token_blocks=0)


def test_training_steps_lower_the_loss(trained):
    module, dm, before, _ = trained
    assert slice_loss(module, dm) < before - 0.3


def test_unused_token_rows_stay_zero(trained):
    module, *_ = trained
    table = module.clip.token_embedding.weight
    used = world_token_ids(module.tokenizer)
    assert table[used].abs().sum(dim=1).gt(0).all()
    assert table.ne(0).any(dim=1).sum() == len(used)


def test_exported_weights_round_trip_through_load_clip(trained):
    module, _, _, path = trained
    assert path.is_file() and path.stat().st_size < 1_000_000  # the 49,408-row table is not stored whole
    loaded = load_clip(TINY, str(path)).model
    for name, tensor in module.clip.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(loaded.state_dict()[name], expected), name
    random = load_clip(TINY, None).model
    assert {k: v.shape for k, v in random.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    with pytest.raises(ValueError, match="set model_name"):
        load_clip(TOY_CLIP_NAME, str(path))
    assert expand_compact_state_dict(torch.load(path, weights_only=True))["token_embedding.weight"].shape == (49408, 32)


def test_export_records_its_software_and_says_whether_it_rewrote_the_same_tensors(trained, tmp_path):
    module, _, _, path = trained
    assert torch.load(path, weights_only=True)["trained_with"]["torch"] == training_environment()["torch"]
    copy = tmp_path / "copy.pt"
    assert module.export(str(copy)) == f"weights written to {copy} (new file)"
    assert module.export(str(copy)) == f"weights written to {copy} (the same tensors as the file it replaces)"
    with torch.no_grad():
        module.clip.visual.proj[0, 0] += 1.0
    try:
        message = module.export(str(copy))
    finally:
        with torch.no_grad():
            module.clip.visual.proj[0, 0] -= 1.0
    total = len(module.clip.state_dict()) + 1  # token_embedding.weight is stored as two: its rows and their index
    assert message.endswith(f"(1 of {total} tensors differ from the file it replaces, trained on the same software and processor)")


def test_a_plain_state_dict_of_our_config_loads_by_its_model_name(trained, tmp_path):
    """open_clip's state dict has OpenAI's keys, but our configs are not OpenAI's architecture (MLP ratio)."""
    module = trained[0]
    torch.save(module.clip.state_dict(), tmp_path / "plain.pt")
    loaded = load_clip(TINY, str(tmp_path / "plain.pt")).model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in module.clip.state_dict().items())
    with pytest.raises(ValueError, match="Set model_name to the weights' architecture"):
        load_clip(TOY_CLIP_NAME, str(tmp_path / "plain.pt"))


def test_fit_from_the_experiment_config_exports(tmp_path):
    out = tmp_path / "w.pt"
    cli_main(["fit", "-c", str(EXPERIMENT), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "2", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--data.val_samples", "4",
              "--model.export_path", str(out)])
    assert load_clip(TOY_CLIP_NAME, str(out)).model.visual.conv1.kernel_size == (8, 8)
    cli_main(["fit", "-c", str(EXPERIMENT), "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--data.batch_size", "4", "--data.val_samples", "4",
              "--model.export_path", str(tmp_path / "not_written.pt")])
    assert not (tmp_path / "not_written.pt").exists()  # fast_dev_run never exports


def test_a_second_phase_starts_from_the_first_phases_export(trained, tmp_path):
    module, _, _, path = trained
    second = ToyCLIP(model_name=TINY, init_weights=str(path))
    for name, tensor in module.clip.state_dict().items():  # the export's float16 values, not a fresh init
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(second.clip.state_dict()[name], expected), name
    assert second.clip.visual.conv1.weight.requires_grad  # trainable again (load_clip freezes its own copy)
    out = tmp_path / "second.pt"
    # the fine-tuning probe of docs/toy_clip_history.md: the shipped weights, every patch token, a new schedule
    cli_main(["fit", "-c", str(EXPERIMENT), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--data.val_samples", "4",
              "--model.init_weights", "shipped", "--model.token_keep", "1.0", "--model.lr", "3e-4",
              "--model.warmup_steps", "10", "--model.export_path", str(out)])
    shipped = load_clip(TOY_CLIP_NAME, "shipped").model.state_dict()
    tuned = load_clip(TOY_CLIP_NAME, str(out)).model.state_dict()
    moved = (tuned["visual.proj"] - shipped["visual.proj"]).abs().max()
    assert 0 < moved < 0.05  # two small steps away from the shipped weights, not from a fresh init
    with pytest.raises(FileNotFoundError, match="--model.init_weights"):
        ToyCLIP(model_name=TINY, init_weights=str(tmp_path / "missing.pt"))


def test_co_occurrence_and_object_crops_of_the_training_stream():
    from lightning_clipes.data.toy_scenes import HOME_BACKGROUND, render_scene
    from lightning_clipes.data.toy_captions import object_crop

    def home_share(**kwargs) -> float:
        scenes = [render_scene(0, FIRST_CLIP_INDEX + i, 32, **kwargs) for i in range(240)]
        return float(np.mean([HOME_BACKGROUND[s.objects[0][0]] == s.background for s in scenes]))

    assert home_share() > 0.7  # the world's own co-occurrence (P_HOME = 0.8)
    assert abs(home_share(p_home=1 / 6, home_weight=1.0) - 1 / 6) < 0.08  # backgrounds drawn independently
    rng = np.random.default_rng(0)
    for i in range(20):
        scene = render_scene(0, FIRST_CLIP_INDEX + i, 128)
        crop = object_crop(scene, rng, 0.3, 64)
        if crop is not None:
            image, labels = crop
            assert image.shape == (64, 64, 3) and labels and set(labels) <= set(scene.labels)


def test_items_mark_the_classes_their_caption_names():
    from lightning_clipes.data.toy_captions import ToyCaptionDataset

    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    data = ToyCaptionDataset(0, FIRST_CLIP_INDEX, 12, 64, tokenizer, p_background=1.0, p_crop=0.5)
    for i in range(len(data)):
        _, labels, text = data.image_and_caption(i)
        _, _, present = data[i]
        named = {c for c in TOY_CLASSES if f"a {c}" in text}
        assert {TOY_CLASSES[k] for k in present.nonzero().flatten().tolist()} == named == set(labels)


def test_background_only_items_name_their_background_alone():
    from lightning_clipes.data.toy_captions import ToyCaptionDataset
    from lightning_clipes.data.toy_scenes import render_background, render_scene

    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    data = ToyCaptionDataset(0, FIRST_CLIP_INDEX, 60, 64, tokenizer, p_crop=0.5, p_empty=0.5)
    empty = [i for i in range(len(data)) if not data.image_and_caption(i)[1]]
    assert 18 <= len(empty) <= 42  # about half
    for i in empty[:6]:
        image, _, text = data.image_and_caption(i)
        kind = text[len("a photo of a "):-1]
        assert text == TOY_TEMPLATE.format(kind) and kind in TOY_BACKGROUNDS
        assert image.shape == (64, 64, 3) and not data[i][2].any()
        # the same texture as that background's pixels in the world's scenes
        scenes = [s for s in (render_scene(0, j, 64) for j in range(80)) if s.background == kind][:3]
        seen = np.concatenate([s.image[s.mask == 0] for s in scenes]).astype(float).mean(0)
        assert np.abs(image.reshape(-1, 3).mean(0) - seen).max() < 25
    np.testing.assert_array_equal(render_background(0, 5, "wall", 32), render_background(0, 5, "wall", 32))
    # p_empty = 0 leaves the stream the shipped CLIP was trained on untouched: the first items' pixels and
    # captions hash as they did before p_empty existed (computed at commit 2792e51)
    zero = ToyCaptionDataset(0, FIRST_CLIP_INDEX, 8, 64, tokenizer, p_crop=0.5, p_empty=0.0)
    digest = hashlib.sha256()
    for i in range(8):
        image, _, text = zero.image_and_caption(i)
        digest.update(image.tobytes())
        digest.update(text.encode())
    assert digest.hexdigest()[:16] == "cff1c7c23df53e4e"
