"""Never train on stale or partial labels (issue #9): entries follow the data, predict is keyed by the
settings, ranks share work and wait without collectives, SIGUSR1 requeues, huge images fit in memory."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lightning_clipes.cli import cli_main
from lightning_clipes.data.pseudo_label_pass import PassAborted, plan_pass, run_pass
from lightning_clipes.data.segmentation_datamodule import VOCSegmentationDataModule
from lightning_clipes.data.store import PseudoLabelStore
from lightning_clipes.data.synthetic import write_synthetic_voc
from lightning_clipes.data.voc_format import VOC_CLASSES, load_mask, parse_labels, read_split
from lightning_clipes.labeler import CLIPESLabeler

REPO = Path(__file__).resolve().parents[1]

# A test-only entry point: the real CLI, with a slower labeller on some ranks and a short process-group timeout.
WRAPPER = '''
import os, sys, time
from datetime import timedelta
if os.environ.get("PG_TIMEOUT"):
    from lightning.pytorch.strategies import DDPStrategy
    init = DDPStrategy.__init__
    def short_timeout(self, *a, **k):
        k["timeout"] = timedelta(seconds=float(os.environ["PG_TIMEOUT"]))
        init(self, *a, **k)
    DDPStrategy.__init__ = short_timeout
from lightning_clipes.components import labelling
call = labelling.Labeller.__call__
def slow(self, items):
    if items and os.environ.get("LOCAL_RANK", "0") in os.environ.get("SLOW_RANKS", "").split(","):
        time.sleep(float(os.environ["SLOW_S"]))
    return call(self, items)
labelling.Labeller.__call__ = slow
from lightning_clipes.cli import main
main(sys.argv[1:])
'''


def labeler(ckpt, **kw):
    kw = {"model_name": "ViT-B-16", "pretrained": str(ckpt), "affinity_layers": 2, "crf": False,
          "preview_images": 0, "save_cams": False, "precision": "32", **kw}
    return CLIPESLabeler(**kw)


def data(voc, store, lab, **kw):
    kw = {"split": "train", "val_split": "val", "store_dir": str(store), "crop_size": 32, "batch_size": 2,
          "num_workers": 0, "labeler": lab, **kw}
    return VOCSegmentationDataModule(str(voc), **kw)


def stamps(store: PseudoLabelStore, ids):
    return {i: store.mask_path(i).stat().st_mtime_ns for i in ids}


def test_rewritten_images_and_changed_labels_are_relabelled_the_rest_is_reused(synthetic_voc, tiny_openai_ckpt, tmp_path):
    ids = read_split(synthetic_voc, "train")
    dm = data(synthetic_voc, tmp_path / "store", labeler(tiny_openai_ckpt))
    dm.setup("fit")
    before = stamps(dm.store, ids)
    # image 0 rewritten at the same path with another size; image 1 gets another label in its XML
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(synthetic_voc / "JPEGImages" / f"{ids[0]}.jpg")
    xml = synthetic_voc / "Annotations" / f"{ids[1]}.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>cow</name></object></annotation>"))
    again = data(synthetic_voc, tmp_path / "store", labeler(tiny_openai_ckpt))
    again.setup("fit")
    assert again.store.root == dm.store.root  # the same store, only two entries redone
    after = stamps(again.store, ids)
    assert {i for i in ids if after[i] != before[i]} == {ids[0], ids[1]}
    assert load_mask(again.store.mask_path(ids[0])).shape == (90, 120)
    assert again.store.read_record(ids[1]).labels == tuple(parse_labels(xml, VOC_CLASSES))
    for i in range(len(again.train_set)):
        again.train_set[i]  # no "Mask of … is (48, 64), its image (90, 120)" in the middle of an epoch


def test_store_key_follows_code_weights_and_resolved_words(tiny_openai_ckpt, monkeypatch):
    from lightning_clipes.data import store_key

    base = labeler(tiny_openai_ckpt)
    assert base.describe()["background"][:2] == ["ground", "land"]  # the words, not the alias 'voc'
    same_words = labeler(tiny_openai_ckpt, background=list(base.describe()["background"]))
    key = base.fingerprint()
    assert same_words.fingerprint() == key
    monkeypatch.setattr(store_key, "code_digest", lambda: "another-version")  # e.g. a fix to gradcam.py
    assert labeler(tiny_openai_ckpt).fingerprint() != key


def test_predict_refuses_other_settings_and_redoes_damaged_or_rewritten_entries(synthetic_voc, tiny_openai_ckpt, tmp_path):
    out = tmp_path / "out"
    common = ["-c", str(REPO / "experiments" / "voc_pseudo_labels.yaml"), "--data.root", str(synthetic_voc),
              "--data.split", "train", "--model.pretrained", str(tiny_openai_ckpt), "--trainer.default_root_dir",
              str(out), "--trainer.accelerator", "cpu", "--data.num_workers", "0", "--model.affinity_layers", "2",
              "--model.crf", "false", "--model.save_cams", "false"]
    cli_main(["predict", *common])
    store = PseudoLabelStore(out / "pseudo_labels")
    ids = read_split(synthetic_voc, "train")
    meta = store.read_meta()
    with pytest.raises(ValueError, match=r"box_threshold: 0\.4 there, 0\.9 now; bg_power: 1\.0 there, 3\.0 now"):
        cli_main(["predict", *common, "--model.bg_power", "3", "--model.box_threshold", "0.9"])
    assert store.read_meta() == meta  # not rewritten to claim the new settings
    before = stamps(store, ids)
    mask = store.mask_path(ids[2])
    mask.write_bytes(mask.read_bytes()[:50])  # damaged
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(synthetic_voc / "JPEGImages" / f"{ids[4]}.jpg")  # rewritten
    cli_main(["predict", *common])
    after = stamps(store, ids)
    assert {i for i in ids if after[i] != before[i]} == {ids[2], ids[4]}
    assert load_mask(store.mask_path(ids[4])).shape == (30, 40)


def test_a_failing_rank_stops_the_others_through_the_store(synthetic_voc, tiny_openai_ckpt, tmp_path):
    lab = labeler(tiny_openai_ckpt)
    images = VOCSegmentationDataModule(str(synthetic_voc), split="train", labeler=None).build_dataset("train")
    store = PseudoLabelStore(tmp_path / "store")
    plan = plan_pass(images, store, "p1")
    (store.root / "passes" / "p1").mkdir(parents=True)
    (store.root / "passes" / "p1" / "abort").write_text("rank 1: RuntimeError: CUDA error")
    with pytest.raises(PassAborted, match="rank 1: RuntimeError: CUDA error"):
        run_pass(lab, images, plan, store, lab.device, progress=False)
    assert not list((store.root / "claims").glob("*.claim"))  # what it held is released

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    lab.clipes.forward = broken
    plan = plan_pass(images, store, "p2")
    with pytest.raises(RuntimeError, match="device-side assert"):
        run_pass(lab, images, plan, store, lab.device, progress=False)
    assert "device-side assert" in (store.root / "passes" / "p2" / "abort").read_text()


def test_an_abandoned_claim_is_taken_over_and_waiting_ranks_do_not_wait_forever(synthetic_voc, tiny_openai_ckpt, tmp_path):
    from lightning_clipes.data.store import ClaimOwner

    lab = labeler(tiny_openai_ckpt)
    images = VOCSegmentationDataModule(str(synthetic_voc), split="train", labeler=None).build_dataset("train")
    store = PseudoLabelStore(tmp_path / "store")
    plan = plan_pass(images, store, "p1")
    ghost = ClaimOwner("another-host", 4242, "", 0, "p1")  # a rank on another node that died holding two images
    for i in plan.todo[:2]:
        store.claim(images.ids[i], ghost)
    past = time.time() - 30
    for i in plan.todo[:2]:
        os.utime(store.claim_path(images.ids[i]), (past, past))
    result = run_pass(lab, images, plan, store, lab.device, progress=False, claim_timeout=20, poll_interval=0.1)
    assert sorted(result.labelled) == sorted(images.ids)
    assert all(store.is_current(images.ids[i], plan.records[i]) for i in plan.todo)


def test_an_image_another_rank_finishes_while_we_wait_is_not_labelled_again(synthetic_voc, tiny_openai_ckpt, tmp_path):
    """The race of a waiting rank: it sees an unfinished image, the other rank writes it and releases its
    claim, then our claim succeeds. The entry must be taken as it is, not labelled a second time."""
    from lightning_clipes.data.store import ClaimOwner

    lab = labeler(tiny_openai_ckpt)
    images = VOCSegmentationDataModule(str(synthetic_voc), split="train", labeler=None).build_dataset("train")
    store = PseudoLabelStore(tmp_path / "store")
    plan = plan_pass(images, store, "p1")
    target = plan.todo[1]
    image_id, record = images.ids[target], plan.records[target]
    other = ClaimOwner("another-host", 4242, "", 0, "p1")  # alive, on another node
    assert store.claim(image_id, other)
    original, calls = store.claim, []

    def claim(claimed_id, owner, timeout=600.0):
        if claimed_id == image_id:
            calls.append(owner)
            if len(calls) == 2:  # the other rank finishes just before our second try
                ghost_mask = np.full(record.size, 7, np.uint8)
                store.write(image_id, record, np.array([6]), ghost_mask, np.ones(record.size))
                store.release(image_id, other)
        return original(claimed_id, owner, timeout)

    store.claim = claim
    result = run_pass(lab, images, plan, store, lab.device, progress=False, poll_interval=0.05)
    assert len(calls) == 2 and image_id not in result.labelled
    assert sorted(result.labelled + [image_id]) == sorted(images.ids)
    assert (store.read_mask(image_id) == 7).all()  # the other rank's entry, kept
    assert not list((store.root / "claims").glob("*.claim"))


# ------------------------------------------------------------------ whole jobs in their own processes
def write_config(tmp_path, voc, ckpt, store, **data_args) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "max_epochs": -1, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "limit_val_batches": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False},
        "model": {"class_path": "lightning_clipes.SegmentationStudent",
                  "init_args": {"num_classes": 21, "arch": "Unet", "encoder_name": "resnet18", "encoder_weights": None,
                                "num_panels": 0}},
        "data": {"class_path": "lightning_clipes.VOCSegmentationDataModule",
                 "init_args": {"root": str(voc), "split": "train", "val_split": "val", "store_dir": str(store),
                               "crop_size": 32, "batch_size": 2, "num_workers": 0, "label_batch_size": 1, **data_args,
                               "labeler": {"class_path": "lightning_clipes.CLIPESLabeler",
                                           "init_args": {"model_name": "ViT-B-16", "pretrained": str(ckpt),
                                                         "affinity_layers": 2, "crf": False, "preview_images": 0,
                                                         "save_cams": False, "precision": "32"}}}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    return path


def fit_process(tmp_path, config, run_dir, env=None, *extra):
    cmd = [sys.executable, str(tmp_path / "wrapper.py"), "fit", "-c", str(config),
           "--trainer.default_root_dir", str(run_dir), *extra]
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pass_logs(store_dir: Path) -> dict:
    (store,) = [p for p in store_dir.iterdir() if p.is_dir()]
    return {f"{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in sorted(store.glob("passes/*/rank*.json"))}


@pytest.mark.slow
def test_two_jobs_on_one_store_label_each_image_once(tiny_openai_ckpt, tmp_path):
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=12, num_val=2, seed=1)
    config = write_config(tmp_path, voc, tiny_openai_ckpt, tmp_path / "store")
    env = {"SLOW_RANKS": "0", "SLOW_S": "0.5"}  # slow enough that the two passes overlap
    jobs = [fit_process(tmp_path, config, tmp_path / f"run{k}", env) for k in range(2)]
    for job in jobs:
        out, _ = job.communicate(timeout=900)
        assert job.returncode == 0, out[-3000:]
    logs = pass_logs(tmp_path / "store")
    assert len(logs) == 2
    labelled = [set(log["labelled"]) for log in logs.values()]
    assert not labelled[0] & labelled[1] and labelled[0] | labelled[1] == set(read_split(voc, "train"))


@pytest.mark.slow
def test_a_rank_slower_than_the_process_group_timeout_does_not_fail_the_job(tiny_openai_ckpt, tmp_path):
    """Rank 1 needs 40 s per batch, the process-group timeout is 60 s: with a barrier after fixed shards rank 0
    would time out waiting; here it takes over rank 1's images and waits by watching the store."""
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=12, num_val=2, seed=1)
    config = write_config(tmp_path, voc, tiny_openai_ckpt, tmp_path / "store")
    env = {"SLOW_RANKS": "1", "SLOW_S": "40", "PG_TIMEOUT": "60"}
    job = fit_process(tmp_path, config, tmp_path / "run", env, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    out, _ = job.communicate(timeout=1200)
    assert job.returncode == 0, out[-3000:]
    logs = pass_logs(tmp_path / "store")
    ranks = {name.split("/")[1]: log for name, log in logs.items()}
    fast, slow = set(ranks["rank0_of2.json"]["labelled"]), set(ranks["rank1_of2.json"]["labelled"])
    assert len(fast) > len(slow) and not fast & slow and fast | slow == set(read_split(voc, "train"))
    assert ranks["rank0_of2.json"]["waited_s"] > 0  # rank 0 waited for rank 1's batch outside any collective


@pytest.mark.slow
def test_sigusr1_during_the_pass_requeues_and_the_requeued_job_labels_the_rest(tiny_openai_ckpt, tmp_path):
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=12, num_val=2, seed=1)
    config = write_config(tmp_path, voc, tiny_openai_ckpt, tmp_path / "store")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "clipes",
             "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLOW_RANKS": "0", "SLOW_S": "1"}
    job = fit_process(tmp_path, config, tmp_path / "run", slurm)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((tmp_path / "store").glob("*/masks/*.png"))) < 3:
        assert job.poll() is None, job.communicate()[0][-3000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert "SIGUSR1 during the labelling pass" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    (store,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    first = {p.stem for p in (store / "masks").glob("*.png")}
    assert 3 <= len(first) < 12 and not list(store.glob("claims/*.claim")) and not list(store.rglob("*.tmp"))
    again = fit_process(tmp_path, config, tmp_path / "run", {**slurm, "SLURM_RESTART_COUNT": "1", "SLOW_S": "0"})
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    (second,) = [log for log in pass_logs(tmp_path / "store").values() if log["labelled"]][-1:]
    assert set(second["labelled"]) == set(read_split(voc, "train")) - first


@pytest.mark.slow
def test_a_5000x4000_image_is_labelled_in_bounded_memory(tiny_openai_ckpt, tmp_path):
    """Without the cap on CLIP's input the tiny CLIP asked for a 49 GB attention buffer here."""
    voc = write_synthetic_voc(tmp_path / "VOC2012", num_train=2, num_val=0, seed=0)
    ids = read_split(voc, "train")
    yy, xx = np.mgrid[0:4000, 0:5000]
    big = np.stack([(xx // 20) % 256, (yy // 16) % 256, np.full_like(xx, 90)], -1).astype(np.uint8)
    Image.fromarray(big).save(voc / "JPEGImages" / f"{ids[0]}.jpg", quality=80)
    code = (
        "import resource, sys; from lightning_clipes.cli import cli_main; "
        f"cli_main(['predict', '-c', {str(REPO / 'experiments' / 'voc_pseudo_labels.yaml')!r}, '--data.root', {str(voc)!r}, "
        f"'--data.split', 'train', '--model.pretrained', {str(tiny_openai_ckpt)!r}, '--trainer.default_root_dir', "
        f"{str(tmp_path / 'out')!r}, '--trainer.accelerator', 'cpu', '--data.num_workers', '0', '--data.batch_size', '1', "
        "'--model.affinity_layers', '2', '--model.save_cams', 'false', '--model.preview_images', '0']); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    peak_gb = int(done.stdout.split("PEAK_KB")[-1].split()[0]) / 2**20
    assert peak_gb < 4.0, f"peak resident memory {peak_gb:.1f} GB"
    assert load_mask(tmp_path / "out" / "pseudo_labels" / "masks" / f"{ids[0]}.png").shape == (4000, 5000)
