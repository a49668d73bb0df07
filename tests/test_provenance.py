"""Provenance of shipped weights: the versions recorded, and the report on what a new export replaces,
checked on hand-made checkpoint dicts."""
from __future__ import annotations

import platform

import torch

from lightning_clipes.components.provenance import replacement_report, training_environment, tensor_differences


def test_training_environment_names_this_install_and_processor():
    record = training_environment()
    assert record["python"] == platform.python_version()
    assert record["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert {"numpy", "open_clip_torch", "lightning"} <= set(record)
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu"]
    assert "gpu" not in training_environment(torch.device("cpu"))


def test_tensor_differences_on_hand_made_dicts():
    a = {"state_dict": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "rows": {"index": torch.arange(3)}, "name": "x"}
    same = {"state_dict": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "rows": {"index": torch.arange(3)}, "name": "y"}
    assert tensor_differences(a, same) == ([], 3)  # strings are not tensors: a name may differ
    value = {"state_dict": {"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-7])}, "rows": {"index": torch.arange(3)}}
    assert tensor_differences(a, value) == (["b"], 3)
    dtype = {"state_dict": {"w": torch.ones(2, 2).half(), "b": torch.zeros(2)}, "rows": {"index": torch.arange(3)}}
    assert tensor_differences(a, dtype) == (["w"], 3)
    missing = {"state_dict": {"w": torch.ones(2, 2)}, "rows": {"index": torch.arange(3)}, "extra": torch.ones(1)}
    assert tensor_differences(a, missing) == (["b", "extra"], 4)
    # a bare state dict and the same wrapped in "state_dict" hold the same tensors
    assert tensor_differences({"w": torch.ones(1)}, {"state_dict": {"w": torch.ones(1)}}) == ([], 1)


def test_replacement_report(tmp_path):
    path = tmp_path / "w.pt"
    new = {"state_dict": {"w": torch.ones(3), "b": torch.zeros(1)}}
    assert replacement_report(path, new) == "new file"
    torch.save({"state_dict": {"w": torch.ones(3), "b": torch.zeros(1)}}, path)
    assert replacement_report(path, new) == "the same tensors as the file it replaces"
    torch.save({"state_dict": {"w": torch.full((3,), 2.0), "b": torch.zeros(1)}}, path)
    assert replacement_report(path, new) == ("1 of 2 tensors differ from the file it replaces (that file does not "
                                             "record the software and processor it was trained on)")
    torch.save({"state_dict": {"w": torch.full((3,), 2.0), "b": torch.zeros(1)},
                "trained_with": {"python": "3.11.7", "torch": "2.14.1", "numpy": "2.4.6"}}, path)
    ours = {"python": "3.11.7", "torch": "2.15.0", "numpy": "2.4.6", "pillow": "13.0.0"}
    assert replacement_report(path, new, ours) == ("1 of 2 tensors differ from the file it replaces; its training "
                                                   "record differs: pillow absent -> 13.0.0, torch 2.14.1 -> 2.15.0")
    same_software = {"python": "3.11.7", "torch": "2.14.1", "numpy": "2.4.6"}
    assert replacement_report(path, new, same_software).endswith(", trained on the same software and processor")
    path.write_bytes(b"not a checkpoint")
    assert replacement_report(path, new).startswith("replaces an unreadable file")
