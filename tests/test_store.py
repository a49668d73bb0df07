"""The pseudo-label store: exact 16-bit confidence, entry records, umask, claims, leftovers, full disks."""
import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lightning_clipes.data import store as store_mod
from lightning_clipes.data.store import (
    ClaimOwner, EntryRecord, PseudoLabelStore, StoreWriter, atomic_write_bytes, decode_confidence, encode_confidence,
    image_record,
)


def entry(store, image_id="a", size=(3, 4), confidence=None):
    record = EntryRecord(size, (100, 5), (2, 7))
    conf = np.full(size, 0.5, np.float32) if confidence is None else confidence
    store.write(image_id, record, np.array([2, 7]), np.ones(size, np.uint8), conf)
    return record


def test_confidence_threshold_is_exact_for_four_decimal_thresholds():
    """floor(c * 60000) of a float32 c is exact, so `>= t` agrees with exact arithmetic on the float32 value."""
    rng = np.random.default_rng(0)
    for t in (0.95, 0.9, 0.99, 0.9999, 0.5, 0.0001, 0.0, 1.0):
        t32 = np.float32(t)
        around = t32 + np.arange(-20, 21, dtype=np.float32) * np.spacing(t32)  # neighbours, one float32 step apart
        c = np.clip(np.concatenate([rng.random(10000, dtype=np.float32), around]), 0, 1)
        expected = c.astype(np.float64) >= t  # the real-number comparison
        np.testing.assert_array_equal(decode_confidence(encode_confidence(c)) >= t, expected, err_msg=str(t))


def test_confidence_round_trips_through_the_png_as_16_bit(tmp_path):
    store = PseudoLabelStore(tmp_path)
    above, below = np.nextafter(np.float32(0.95), np.float32(1)), np.nextafter(np.float32(0.95), np.float32(0))
    conf = np.array([[above, below, 1.0, 0.0]] * 3, np.float32)  # 0.95000005 and 0.94999993
    entry(store, confidence=conf)
    with Image.open(store.confidence_path("a")) as img:
        assert np.asarray(img).dtype == np.uint16
    _, got = store.read("a")
    assert got.dtype == np.float64
    assert (got >= 0.95).tolist()[0] == [True, False, True, False]  # the 8-bit store said 243/255 = 0.9529


def test_entry_record_lives_in_the_mask_and_decides_reuse(tmp_path):
    store = PseudoLabelStore(tmp_path)
    record = entry(store)
    assert store.read_record("a") == record and store.is_current("a", record)
    assert not store.is_current("a", EntryRecord((3, 4), (100, 6), (2, 7)))  # file rewritten (new mtime)
    assert not store.is_current("a", EntryRecord((4, 3), (100, 5), (2, 7)))  # other pixel size
    assert not store.is_current("a", EntryRecord((3, 4), (100, 5), (7, 2)))  # other labels
    assert not store.is_current("b", record)


def test_truncated_or_garbage_masks_count_as_damaged(tmp_path):
    store = PseudoLabelStore(tmp_path)
    record = entry(store)
    data = store.mask_path("a").read_bytes()
    store.mask_path("a").write_bytes(data[:-20])
    assert store.read_record("a") is None and not store.is_current("a", record)
    store.mask_path("a").write_bytes(b"garbage" * 10)
    assert store.read_record("a") is None


def test_image_record_reads_header_stat_and_labels(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (7, 5)).save(path)
    rec = image_record(path, [3, 1])
    assert rec.size == (5, 7) and rec.file == (path.stat().st_size, path.stat().st_mtime_ns) and rec.labels == (3, 1)


def test_files_follow_the_umask_so_a_group_can_read_a_shared_store(tmp_path):
    old = os.umask(0o002)
    try:
        store_mod._UMASK = 0o002
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o664
        store_mod._UMASK = 0o077
        atomic_write_bytes(tmp_path / "g.bin", b"x")
        assert (tmp_path / "g.bin").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
        store_mod._UMASK = old


def test_the_umask_of_the_process_is_the_default(tmp_path):
    code = ("import os; os.umask(0o022); from lightning_clipes.data.store import atomic_write_bytes as w; "
            f"from pathlib import Path; w(Path({str(tmp_path / 'h.bin')!r}), b'x')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "h.bin").stat().st_mode & 0o777 == 0o644


def test_full_disk_names_the_path_and_what_to_do(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", full)
    with pytest.raises(OSError, match=r"No space left.*f\.bin.*store_dir"):
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert not list(tmp_path.glob(".*.tmp"))


def test_claims_are_exclusive_until_released(tmp_path):
    store = PseudoLabelStore(tmp_path)
    me, other = ClaimOwner.here("p1"), ClaimOwner("elsewhere", 1, "", 0, "p9")
    assert store.claim("x", me)
    assert not store.claim("x", other)  # a live claim on another host, younger than the timeout
    store.release("x", other)  # not theirs: stays
    assert store.claim_path("x").exists()
    store.release("x", me)
    assert not store.claim_path("x").exists() and store.claim("x", other)


def test_stale_claims_are_taken_over(tmp_path):
    store = PseudoLabelStore(tmp_path)
    me = ClaimOwner.here("p1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.claim("gone", ClaimOwner(me.host, dead.pid, "", 0, "p0"))  # its process has exited
    assert store.claim("gone", me)
    store.claim("old", ClaimOwner("elsewhere", 1, "", 0, "p0"))
    past = time.time() - 700
    os.utime(store.claim_path("old"), (past, past))
    assert not store.claim("old", me, timeout=800) and store.claim("old", me, timeout=600)
    requeued = ClaimOwner("node2", 5, "77", 1, "p2")
    store.claim("job", ClaimOwner("node1", 9, "77", 0, "p1"))  # the same SLURM job before its requeue
    assert store.claim("job", requeued)
    store.claim("mine", ClaimOwner(me.host, me.pid, "", 0, "earlier"))  # this process, an earlier pass
    assert store.claim("mine", me)


def test_failures_are_recorded_per_pass_and_cleared_by_a_write(tmp_path):
    store = PseudoLabelStore(tmp_path)
    store.record_failure("a", "Cannot decode", "pass-1")
    assert store.failure("a", "pass-1") == "Cannot decode" and store.failure("a", "pass-2") is None
    entry(store)
    assert store.failure("a", "pass-1") is None


def test_old_temporary_files_are_cleaned_young_ones_kept(tmp_path):
    store = PseudoLabelStore(tmp_path)
    entry(store)
    old, young = tmp_path / "masks" / ".a.png.x.tmp", tmp_path / "masks" / ".b.png.y.tmp"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert store.clean_temporary(older_than=3600) == 1
    assert not old.exists() and young.exists() and store.mask_path("a").exists()


def test_writer_writes_in_the_background_and_raises_the_first_error(tmp_path):
    store = PseudoLabelStore(tmp_path)
    released = []
    writer = StoreWriter(store, on_written=released.append)
    record = EntryRecord((2, 2), (1, 1), (0,))
    for i in range(5):
        writer.write(f"img{i}", record, np.array([0]), np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.float32))
    writer.flush()
    assert sorted(released) == [f"img{i}" for i in range(5)] and all(store.is_current(f"img{i}", record) for i in range(5))
    writer.write("bad", record, np.array([0]), np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="image's size"):
        writer.close()


def test_meta_round_trips(tmp_path):
    store = PseudoLabelStore(tmp_path)
    store.write_meta({"key": "abc", "n": 1})
    assert store.read_meta() == {"key": "abc", "n": 1}
    assert json.loads((tmp_path / "meta.json").read_text())["key"] == "abc"
