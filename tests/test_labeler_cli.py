"""The labeler as a command: predict writes a resumable store, validate scores it (issue #2)."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_clipes.cli import cli_main
from lightning_clipes.components.pseudo_mask import cams_to_label
from lightning_clipes.data.voc_format import VOC_CLASSES, load_mask, parse_labels, read_split

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "voc_pseudo_labels.yaml")


def run(stage, voc, ckpt, out, *extra):
    args = [stage, "-c", CONFIG, "--data.root", str(voc), "--data.split", "train", "--model.pretrained", str(ckpt),
            "--trainer.default_root_dir", str(out), "--trainer.accelerator", "cpu", "--data.num_workers", "0",
            "--model.affinity_layers", "2", *extra]
    return cli_main(args)


def test_predict_writes_every_image_in_the_reference_format(synthetic_voc, tiny_openai_ckpt, tmp_path):
    out = tmp_path / "out"
    run("predict", synthetic_voc, tiny_openai_ckpt, out, "--model.crf", "false")  # masks = argmax of the cams
    store = out / "pseudo_labels"
    ids = read_split(synthetic_voc, "train")
    assert sorted(p.stem for p in (store / "masks").glob("*.png")) == sorted(ids)
    for image_id in ids:
        with np.load(store / "cams" / f"{image_id}.npz") as f:
            keys, cams = f["keys"], f["cams"]
        labels = parse_labels(synthetic_voc / "Annotations" / f"{image_id}.xml", VOC_CLASSES)
        assert keys.dtype == np.int64 and keys.tolist() == labels
        w, h = Image.open(synthetic_voc / "JPEGImages" / f"{image_id}.jpg").size
        assert cams.dtype == np.float16 and cams.shape == (len(labels), h, w)
        assert 0 <= cams.min() and cams.max() <= 1
        mask = load_mask(store / "masks" / f"{image_id}.png")
        assert set(np.unique(mask)) <= {0, *(k + 1 for k in labels)}
        relabel = cams_to_label(torch.from_numpy(cams.astype(np.float32)), torch.from_numpy(keys)).numpy()
        assert (relabel == mask).mean() > 0.99  # float16 storage may flip exact ties only
    assert not list(store.rglob("*.tmp"))


def test_rerun_skips_finished_images_and_redoes_missing_ones(synthetic_voc, tiny_openai_ckpt, tmp_path):
    out = tmp_path / "out"
    run("predict", synthetic_voc, tiny_openai_ckpt, out)
    masks = sorted((out / "pseudo_labels" / "masks").glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in masks}
    masks[0].unlink()
    cli = run("predict", synthetic_voc, tiny_openai_ckpt, out)
    assert masks[0].exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != masks[0])
    masks[1].unlink()  # once more in this process, same datamodule: trainer.predict returns the ids labelled
    done = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert [i for batch in done for i in batch] == [masks[1].stem] and masks[1].exists()
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)  # predict's skipping leaves validate every image
    assert sorted(cli.trainer.val_dataloaders.dataset.ids) == sorted(read_split(synthetic_voc, "train"))


def test_interrupted_run_leaves_no_partial_file_and_resumes(synthetic_voc, tiny_openai_ckpt, tmp_path, monkeypatch):
    from lightning_clipes.data import store as store_mod

    out = tmp_path / "out"
    real_replace, third = os.replace, read_split(synthetic_voc, "train")[2]

    def dying_replace(src, dst):
        if third in str(dst):  # killed while the third image's files are written
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", dying_replace)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run("predict", synthetic_voc, tiny_openai_ckpt, out, "--model.preview_images", "0")
    store = out / "pseudo_labels"
    assert not (store / "masks" / f"{third}.png").exists() and not list(store.rglob("*.tmp"))
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    run("predict", synthetic_voc, tiny_openai_ckpt, out)
    assert len(list((store / "masks").glob("*.png"))) == len(read_split(synthetic_voc, "train"))


def test_validate_reports_miou_of_the_written_masks(synthetic_voc, tiny_openai_ckpt, tmp_path):
    out = tmp_path / "out"
    run("predict", synthetic_voc, tiny_openai_ckpt, out)
    cli = run("validate", synthetic_voc, tiny_openai_ckpt, out)
    metrics = cli.trainer.callback_metrics
    # independent: mIoU over classes present in GT or prediction, from the PNGs predict wrote
    conf = np.zeros((21, 21), np.int64)
    for image_id in read_split(synthetic_voc, "train"):
        gt = load_mask(synthetic_voc / "SegmentationClass" / f"{image_id}.png").astype(np.int64)
        pred = load_mask(out / "pseudo_labels" / "masks" / f"{image_id}.png").astype(np.int64)
        keep = gt != 255
        np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    expected = np.mean(tp[union > 0] / union[union > 0])
    assert float(metrics["pseudo/mIoU"]) == pytest.approx(expected, abs=1e-4)
    assert 0 <= float(metrics["pseudo/mIoU_cam"]) <= 1
    assert "pseudo/IoU/aeroplane" in metrics


def test_image_without_labels_is_skipped_with_a_warning(synthetic_voc, tiny_openai_ckpt, tmp_path):
    ids = read_split(synthetic_voc, "train")
    xml = synthetic_voc / "Annotations" / f"{ids[0]}.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("<object>")] + "</annotation>\n")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=f"no labelled object.*{ids[0]}"):
        run("predict", synthetic_voc, tiny_openai_ckpt, out)
    done = {p.stem for p in (out / "pseudo_labels" / "masks").glob("*.png")}
    assert done == set(ids[1:])


def test_unreadable_image_names_the_file_or_is_skipped_by_flag(synthetic_voc, tiny_openai_ckpt, tmp_path):
    ids = read_split(synthetic_voc, "train")
    bad = synthetic_voc / "JPEGImages" / f"{ids[1]}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(OSError, match=ids[1]):
        run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "a")
    with pytest.warns(UserWarning, match=f"could not be labelled: {ids[1]}"):
        run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "b", "--data.skip_unreadable", "true")
    assert {p.stem for p in (tmp_path / "b" / "pseudo_labels" / "masks").glob("*.png")} == set(ids) - {ids[1]}


def test_unknown_class_in_annotation_and_vocabulary_mismatch(synthetic_voc, tiny_openai_ckpt, tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 2"):
        run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "a", "--model.class_names", "[cat, dog]")
    ids = read_split(synthetic_voc, "train")
    xml = synthetic_voc / "Annotations" / f"{ids[0]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>unicorn", 1))
    with pytest.raises(ValueError, match="unicorn"):
        run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "b")


def test_config_typo_fails_before_anything_runs(synthetic_voc, tiny_openai_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("predict", synthetic_voc, tiny_openai_ckpt, tmp_path / "out", "--model.box_treshold", "0.5")
    assert "box_treshold" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["clipes", "lightning"])
def test_the_documented_command_line_runs(command, synthetic_voc, tiny_openai_ckpt, tmp_path):
    exe = shutil.which(command)
    if exe is None:
        pytest.skip(f"{command} console script not installed (pip install -e .)")
    out = tmp_path / "OUT"
    subprocess.run(
        [exe, "predict", "-c", CONFIG, "--data.root", str(synthetic_voc), "--data.split", "train",
         "--model.pretrained", str(tiny_openai_ckpt), "--trainer.default_root_dir", str(out),
         "--trainer.accelerator", "cpu"],
        check=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600,
    )
    assert len(list((out / "pseudo_labels" / "masks").glob("*.png"))) == len(read_split(synthetic_voc, "train"))


def test_odd_image_modes_and_sizes_go_through_the_labeler(synthetic_voc, tiny_openai_ckpt, tmp_path):
    """Grey, CMYK, RGBA, 16-bit and smaller-than-a-patch images: maps at each image's own size."""
    from PIL import Image

    ids = read_split(synthetic_voc, "train")
    rng = np.random.default_rng(0)
    jpeg = lambda i: synthetic_voc / "JPEGImages" / f"{ids[i]}.jpg"  # noqa: E731 - PIL reads by content
    Image.open(jpeg(0)).convert("L").save(jpeg(0), format="JPEG")
    Image.open(jpeg(1)).convert("CMYK").save(jpeg(1), format="JPEG")
    Image.open(jpeg(2)).convert("RGBA").save(jpeg(2), format="PNG")
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(jpeg(3), format="PNG")
    Image.fromarray(rng.integers(0, 255, (7, 5, 3), dtype=np.uint8)).save(jpeg(4), format="PNG")
    out = tmp_path / "out"
    run("predict", synthetic_voc, tiny_openai_ckpt, out)
    for i in range(5):
        with np.load(out / "pseudo_labels" / "cams" / f"{ids[i]}.npz") as f:
            w, h = Image.open(jpeg(i)).size
            assert f["cams"].shape[1:] == (h, w) and np.isfinite(f["cams"].astype(np.float32)).all()
    assert len(list((out / "pseudo_labels" / "preview").glob("*.jpg"))) == min(8, len(ids))


def test_select_prompt_is_a_clipes_subcommand(synthetic_voc, tiny_openai_ckpt, tmp_path, capsys):
    from lightning_clipes.cli import main

    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na clean origami {}.\n")
    main(["select-prompt", "-c", CONFIG, "--data.root", str(synthetic_voc), "--pretrained", str(tiny_openai_ckpt),
          "--templates", str(templates)])
    table = capsys.readouterr().out
    assert "a clean origami {}." in table and "a photo of a {}." in table
