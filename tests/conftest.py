"""Tiny fixtures: a random CLIP in OpenAI format (width 64, 2 blocks) and synthetic VOC folders; and two
guards: tests write only under their tmp dirs, and no finalizer writes a context variable."""
from __future__ import annotations

import contextvars
import gc
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_clip_state_dict(seed: int = 0, layers: int = 3, patch: int = 16) -> dict:
    """A random CLIP ViT with OpenAI's key names (QuickGELU, 1 head of 64, 4x4 pretrained grid)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=layers, width=64, patch_size=patch, image_size=4 * patch),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    )
    return model.state_dict()


@pytest.fixture(scope="session")
def tiny_openai_ckpt(tmp_path_factory) -> Path:
    """Path of a random OpenAI-format state dict (the format of CLIP-ES's ViT-B-16.pt, tiny)."""
    path = tmp_path_factory.mktemp("weights") / "tiny-ViT.pt"
    torch.save(tiny_clip_state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_openai_ckpt):
    from lightning_clipes.components.clip_loader import load_clip

    return load_clip("ViT-B-16", str(tiny_openai_ckpt))


@pytest.fixture
def synthetic_voc(tmp_path) -> Path:
    """A fresh synthetic VOC2012-layout folder (3 classes, 64-96 px images)."""
    from lightning_clipes.data.synthetic import write_synthetic_voc

    return write_synthetic_voc(tmp_path / "VOC2012", num_train=6, num_val=3, seed=0)


def _stray_files(repo: Path) -> set[str]:
    """Untracked or ignored paths in the checkout, apart from caches that Python and pytest keep."""
    import subprocess

    done = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return set()
    paths = {line[3:] for line in done.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if "__pycache__" not in p and not p.startswith((".pytest_cache", "lightning_clipes.egg-info"))}


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_under_their_tmp_dirs():
    """The CI run must leave `git status` clean: a test that writes into the checkout fails the session."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        yield
        return
    before = _stray_files(repo)
    yield
    new = sorted(_stray_files(repo) - before)
    assert not new, f"tests wrote into the checkout: {new[:10]}"


class ContextVarWritesInGC:
    """Records context-variable writes that run inside a garbage collection (finalizers, weakref callbacks).

    On Python < 3.12 such a write can corrupt the context when the collection started inside another write
    (CPython gh-148891). In CI a failed run's progress bar, finalized by the collector, wrote to stderr
    through W&B's console capture (which sets context variables) and every later jsonargparse parse failed.
    """

    def __init__(self) -> None:
        self.stacks: list[str] = []
        self._outer = None

    def _profile(self, frame, event, arg) -> None:
        owner = getattr(arg, "__self__", None)
        if event == "c_call" and getattr(arg, "__name__", "") in ("set", "reset") and isinstance(owner, contextvars.ContextVar):
            self.stacks.append("".join(traceback.format_stack(frame, limit=12)))

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._outer = sys.getprofile()
            sys.setprofile(self._profile)
        else:
            sys.setprofile(self._outer)

    def __enter__(self) -> "ContextVarWritesInGC":
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)


@pytest.fixture(autouse=True)
def no_context_variable_writes_in_garbage_collection():
    """Fails the test whose garbage made such a write: a full collection after each test (0.1–0.2 s here) finalizes
    what the test left behind while the guard watches, instead of whenever a later test triggers one."""
    with ContextVarWritesInGC() as watch:
        yield
        gc.collect()
    if watch.stacks:
        pytest.fail("A finalizer wrote a context variable during garbage collection (can corrupt the context on "
                    "Python 3.11, CPython gh-148891); close the object explicitly instead:\n" + watch.stacks[0],
                    pytrace=False)
