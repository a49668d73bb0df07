"""Sharpness-based prompt selection (method §1): the formula, the ranking and the command."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_clipes.components.prompts import CLIPES_TEMPLATE, encode_prompts
from lightning_clipes.data.synthetic import write_synthetic_voc
from lightning_clipes.data.voc_format import VOC_CLASSES, parse_labels, read_split
from lightning_clipes.prompt_selection import (
    default_templates, format_table, image_features, main, rank_templates, template_sharpness,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of a {}.", CLIPES_TEMPLATE, "itap of a {}."]


def literal_sharpness(image_feats, labels, text_feats, scale):
    """Eq. 9 written out: softmax over all classes, var/mean (ddof=0) of the targets, mean over multi-label images."""
    img = np.asarray(image_feats, np.float64)
    txt = np.asarray(text_feats, np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    values = []
    for feat, labs in zip(img, labels):
        if len(labs) < 2:
            continue
        logits = scale * (txt @ feat)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        t = p[list(labs)]
        mean = sum(t) / len(t)
        values.append(sum((x - mean) ** 2 for x in t) / len(t) / mean)
    return float(np.mean(values)), len(values)


def test_template_sharpness_is_the_formula_with_population_variance():
    rng = np.random.default_rng(0)
    image_feats, text_feats = rng.normal(size=(5, 8)), rng.normal(size=(4, 8))
    labels = [[0, 1], [2], [0, 1, 3], [1, 3], [3, 2, 0]]  # image 1 has one label: skipped
    value, used = template_sharpness(torch.tensor(image_feats), labels, torch.tensor(text_feats), 10.0)
    expected, n = literal_sharpness(image_feats, labels, text_feats, 10.0)
    assert used == n == 4
    assert value == pytest.approx(expected, rel=1e-12)
    img = image_feats / np.linalg.norm(image_feats, axis=1, keepdims=True)
    txt = text_feats / np.linalg.norm(text_feats, axis=1, keepdims=True)
    probs = torch.tensor(10.0 * img @ txt.T).softmax(-1).numpy()
    ddof1 = np.mean([np.var(probs[i, labs], ddof=1) / probs[i, labs].mean() for i, labs in enumerate(labels) if len(labs) > 1])
    assert value != pytest.approx(ddof1, rel=1e-3)  # the sample variance would give another number


def test_template_sharpness_needs_a_multi_label_image():
    with pytest.raises(ValueError, match="two or more labels"):
        template_sharpness(torch.randn(2, 4), [[0], [1]], torch.randn(3, 4), 100.0)


def test_default_templates_are_clips_80_and_clipes_own():
    templates = default_templates()
    assert len(templates) == 81 and templates[0] == "a bad photo of a {}." and templates[-1] == CLIPES_TEMPLATE
    assert all(t.count("{}") == 1 for t in templates)


def eval_preprocess(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """CLIP's eval preprocessing by hand: shortest side to `size` (PIL bicubic), center crop, normalise."""
    h, w = image.shape[:2]
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    pil = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    x = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


def test_rank_templates_equals_a_literal_recomputation(tiny_clip):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(40, 70, 3), (64, 64, 3), (90, 50, 3), (33, 47, 3)]]
    labels = [[0, 1], [2], [1, 2, 3], [3, 0]]
    names = ["aeroplane", "bicycle", "bird avian", "person with clothes,people,human"]
    rows = rank_templates(tiny_clip, images, labels, names, TEMPLATES, batch_size=3)

    model = tiny_clip.model
    batch = torch.stack([eval_preprocess(im, 64, tiny_clip.mean, tiny_clip.std) for im in images])
    with torch.no_grad():
        feats = model.encode_image(batch)
    assert torch.allclose(image_features(tiny_clip, images), feats / feats.norm(dim=-1, keepdim=True), atol=1e-5)
    scale = model.logit_scale.exp().item()
    expected = {t: literal_sharpness(feats.numpy(), labels, encode_prompts(model, tiny_clip.tokenizer, names, [t]).numpy(),
                                     scale) for t in TEMPLATES}
    assert sorted(r["template"] for r in rows) == sorted(TEMPLATES)
    for row in rows:
        assert row["sharpness"] == pytest.approx(expected[row["template"]][0], rel=1e-4)
        assert row["images"] == 3
    assert [r["sharpness"] for r in rows] == sorted(r["sharpness"] for r in rows)
    table = format_table(rows, top=2)
    assert table.splitlines()[2].startswith(f"| 1 | {rows[0]['sharpness']:.6g} | {rows[0]['template']}")
    assert "1 more" in table


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return path


def data_args(voc):
    return ["--data.class_path", "lightning_clipes.VOCDataModule", "--data.init_args.root", str(voc),
            "--data.init_args.split", "train", "--data.init_args.num_workers", "0"]


def test_command_prints_and_writes_the_ranking(synthetic_voc, tiny_openai_ckpt, template_file, tmp_path, capsys):
    out = tmp_path / "ranking.csv"
    rows = main([*data_args(synthetic_voc), "--pretrained", str(tiny_openai_ckpt), "--templates", str(template_file),
                 "--output", str(out), "--batch_size", "2"])
    multi = [i for i in read_split(synthetic_voc, "train")
             if len(parse_labels(synthetic_voc / "Annotations" / f"{i}.xml", VOC_CLASSES)) >= 2]
    assert len(rows) == 3 and {r["images"] for r in rows} == {len(multi)} and len(multi) >= 2
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 3 and all(r["template"] in line for r, line in zip(rows, table[2:]))
    with out.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [w["template"] for w in written] == [r["template"] for r in rows]
    assert [float(w["sharpness"]) for w in written] == [r["sharpness"] for r in rows]

    # The labeler config works as it is: model/trainer/seed_everything are read or ignored, not built.
    same = main(["-c", str(REPO / "experiments" / "voc_pseudo_labels.yaml"), "--data.root", str(synthetic_voc),
                 "--data.num_workers", "0", "--model.pretrained", str(tiny_openai_ckpt), "--templates", str(template_file)])
    assert [r["template"] for r in same] == [r["template"] for r in rows]
    assert [r["sharpness"] for r in same] == pytest.approx([r["sharpness"] for r in rows], rel=1e-5)  # batch size 32 vs 2


def test_command_rejects_a_template_without_placeholder(synthetic_voc, tiny_openai_ckpt, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of something.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"exactly one '\{\}'.*a photo of something"):
        main([*data_args(synthetic_voc), "--pretrained", str(tiny_openai_ckpt), "--templates", str(bad)])


def test_command_needs_multi_label_images(tiny_openai_ckpt, template_file, tmp_path):
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=4, num_val=1, max_objects=1, seed=0)
    with pytest.raises(ValueError, match="two or more labels"):
        main([*data_args(voc), "--pretrained", str(tiny_openai_ckpt), "--templates", str(template_file)])
