"""Load a frozen open_clip ViT from a pretrained tag, an OpenAI ``.pt`` file or an open_clip checkpoint.

CLIP-ES users already have OpenAI's ``ViT-B-16.pt`` (a TorchScript archive) or a plain state dict
with OpenAI's key names; both are built with open_clip's OpenAI builder (QuickGELU, architecture
read off the state dict). Pretrained tags (``openai``, ``laion2b_s34b_b88k`` ...) go through
``open_clip.create_model``, and so do open_clip training checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.overrides import TorchFunctionMode

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # weights the package ships
SHIPPED = "shipped"  # pretrained tag: the weights the package ships for model_name (weights/<model_name>.pt)
_MISSING_WEIGHTS_HELP = (
    "Set the labeler's pretrained (--model.pretrained in clipes predict/validate, "
    "--data.labeler.init_args.pretrained in clipes fit) to a local OpenAI-format checkpoint (CLIP-ES uses ViT-B-16.pt from "
    "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt), "
    "to an open_clip checkpoint, or to an open_clip pretrained tag such as 'openai' (needs network "
    "access or a filled HF/open_clip cache); null gives random weights (meaningless masks)."
)


@dataclass
class LoadedCLIP:
    """A frozen CLIP model with what is needed to feed it."""

    model: nn.Module  # open_clip CLIP, eval mode, float32, requires_grad=False
    tokenizer: Callable[[list[str]], torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def register_clip_config(name: str, config: dict) -> None:
    """Make ``name`` an open_clip model name (like open_clip's ``add_model_config``), e.g. a tiny ViT for tests."""
    folder = Path(tempfile.mkdtemp(prefix="clipes_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def _register_builtin_configs() -> None:
    if _CONFIG_DIR.is_dir():
        open_clip.add_model_config(_CONFIG_DIR)


_register_builtin_configs()


class _SkipRandomInit(TorchFunctionMode):
    """Skips ``torch.nn.init``'s random initialisation while a CLIP is built whose weights are all loaded right
    after by a strict ``load_state_dict`` (every path of :func:`_build` but random weights): ViT-B/16 builds in
    0.4 s instead of 1.5 s on a 2-core CPU. ``nn.init``'s functions hand themselves to the active
    torch-function mode, so nothing is patched; the mode is thread-local and ends with the ``with`` block.
    Buffers the constructors compute (the causal mask) are computed as usual; weights are left as allocated
    until the load fills them."""

    INIT = frozenset(getattr(nn.init, name) for name in (
        "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
        "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _unfilled(model_name: str, quick_gelu: Optional[bool]) -> nn.Module:
    """open_clip's ``model_name`` for a strict ``load_state_dict`` of ours to fill (built under
    :class:`_SkipRandomInit`), without open_clip's warning that the model was "initialized randomly"."""
    def quiet(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    logging.getLogger().addFilter(quiet)  # open_clip logs on the root logger
    try:
        return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(quick_gelu))
    finally:
        logging.getLogger().removeFilter(quiet)


def _read_checkpoint(path: Path) -> tuple[dict, bool]:
    """Return (state_dict-or-checkpoint, is_torchscript). Tries TorchScript first, as OpenAI's loader does."""
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; OpenAI ships such files
            archive = torch.jit.load(str(path), map_location="cpu")
        return {k: v for k, v in archive.state_dict().items()}, True
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for foreign files
        if "Unsupported global" in str(err):
            # torch's own message suggests weights_only=False, which would run whatever code the file holds
            reason = ("it holds pickled Python objects besides tensors, and lightning_clipes loads weights only (a "
                      "pickle can run code). Save the weights alone: torch.save(model.state_dict(), PATH)")
        else:
            reason = f"it is not a PyTorch checkpoint or is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        raise ValueError(f"Could not read CLIP weights {path}: {reason}. {_MISSING_WEIGHTS_HELP}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"CLIP checkpoint {path} holds a {type(ckpt).__name__}, expected a state dict.")
    return ckpt, False


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder (``torch.save`` files have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def _is_openai_state_dict(sd: dict) -> bool:
    return "visual.proj" in sd and "visual.conv1.weight" in sd and "token_embedding.weight" in sd


# ------------------------------------------------- compact checkpoints (the package's own toy CLIP)
COMPACT_FORMAT = "lightning_clipes.compact_clip/1"


def compact_state_dict(state_dict: dict, model_name: str, dtype: torch.dtype = torch.float16) -> dict:
    """A small file for a small CLIP: float tensors stored as ``dtype``; ``token_embedding.weight``
    (49,408 rows for open_clip's BPE vocabulary) stored as its non-zero rows and their indices.

    Returns ``{"format", "model_name", "state_dict", "token_rows": {"index", "rows", "num_rows"}}``;
    :func:`expand_compact_state_dict` gives back a full float32 state dict (zero rows where none
    were stored). A model trained with the unused rows held at zero round-trips up to ``dtype``.
    """
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone() for k, v in state_dict.items()}
    table = sd.pop("token_embedding.weight")
    index = table.ne(0).any(dim=1).nonzero().flatten()
    return {"format": COMPACT_FORMAT, "model_name": model_name, "state_dict": sd,
            "token_rows": {"index": index.to(torch.int32), "rows": table[index].clone(), "num_rows": table.shape[0]}}


def expand_compact_state_dict(ckpt: dict) -> dict:
    """The float32 state dict of a :func:`compact_state_dict` checkpoint."""
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    rows = ckpt["token_rows"]
    table = torch.zeros(int(rows["num_rows"]), rows["rows"].shape[1])
    table[rows["index"].long()] = rows["rows"].float()
    sd["token_embedding.weight"] = table
    return sd


def _is_compact(ckpt: dict) -> bool:
    return ckpt.get("format") == COMPACT_FORMAT


def _build_compact(ckpt: dict, model_name: str, path: Path, quick_gelu: Optional[bool]) -> nn.Module:
    if ckpt["model_name"] != model_name:
        raise ValueError(f"{path} holds weights of {ckpt['model_name']!r}, not {model_name!r}; set model_name to "
                         f"{ckpt['model_name']!r}.")
    model = _unfilled(model_name, quick_gelu)
    model.load_state_dict(expand_compact_state_dict(ckpt))
    return model
# ------------------------------------------------------------------------ end of compact checkpoints


def _build(model_name: str, pretrained: Optional[str], quick_gelu: Optional[bool]) -> tuple[nn.Module, str]:
    """Return (model, tokenizer model name)."""
    if pretrained is None:
        return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(quick_gelu)), model_name
    if pretrained == SHIPPED:
        pretrained = str(shipped_weights(model_name))
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        ckpt, scripted = _read_checkpoint(path)
        if not scripted and _is_compact(ckpt):
            return _build_compact(ckpt, model_name, path, quick_gelu), model_name
        if (scripted or _is_openai_state_dict(ckpt)) and quick_gelu is not False:
            # OpenAI format: architecture inferred from the tensors, QuickGELU, fp16 round-trip as OpenAI's loader.
            sd = {k: v for k, v in ckpt.items() if not k.endswith("attn_mask")}  # scripted buffers, not weights
            try:
                model = build_model_from_openai_state_dict(sd, quick_gelu=True)  # builds and loads strictly
                return model, "ViT-B-16"  # every OpenAI CLIP uses the same BPE tokenizer
            except (RuntimeError, ValueError) as err:  # e.g. a config of ours (MLP ratio 2) as a plain state dict
                if scripted or model_name not in open_clip.list_models():
                    raise
                model = _unfilled(model_name, quick_gelu)
                try:
                    model.load_state_dict(sd)
                except RuntimeError:
                    raise ValueError(f"{path} is neither an OpenAI-architecture CLIP nor weights of {model_name!r} "
                                     f"({str(err).splitlines()[-1].strip()}). Set model_name to the weights' "
                                     "architecture.") from err
                return model, model_name
        model = open_clip.create_model(model_name, pretrained=str(path), force_quick_gelu=bool(quick_gelu))  # strict load
        return model, model_name
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"CLIP weights not found: {pretrained}. {_MISSING_WEIGHTS_HELP}")
    known = open_clip.list_pretrained_tags_by_model(model_name) if model_name in open_clip.list_models() else []
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip model name {model_name!r}. Valid names include: "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT'))}."
        )
    if pretrained not in known:
        raise ValueError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} "
            f"(tags: {', '.join(known) or 'none'}). {_MISSING_WEIGHTS_HELP}"
        )
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=bool(quick_gelu))
    except Exception as err:  # noqa: BLE001 - network/cache failures come in many types
        raise RuntimeError(f"Could not load {model_name} weights {pretrained!r}: {err}. {_MISSING_WEIGHTS_HELP}") from err
    return model, model_name


def shipped_weights(model_name: str) -> Path:
    """The file behind ``pretrained: shipped``: weights that come with the package (the toy CLIP's)."""
    path = WEIGHTS_DIR / f"{model_name}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
        raise FileNotFoundError(f"The package ships no weights for {model_name!r} (it has: {', '.join(have) or 'none'}). "
                                f"{_MISSING_WEIGHTS_HELP}")
    return path


def check_supported(visual: nn.Module) -> None:
    """Raise a clear error for open_clip towers CLIP-ES cannot run on (needs a plain ViT with MHA blocks)."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"CLIP-ES needs a ViT image tower, got {type(visual).__name__}. Choose a ViT model (e.g. ViT-B-16)."
        )
    if visual.attn_pool is not None:
        raise ValueError("CLIP-ES needs a ViT without attention pooling (CoCa-style towers are not supported).")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise ValueError(
                f"CLIP-ES reads attention weights from nn.MultiheadAttention blocks; this model uses "
                f"{type(block).__name__}. Choose an OpenAI-style ViT (ViT-B-16, ViT-L-14, ...)."
            )


def load_clip(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai", quick_gelu: Optional[bool] = None) -> LoadedCLIP:
    """Build a frozen float32 CLIP in eval mode.

    Args:
        model_name: open_clip model name (``ViT-B-16``, or one registered with :func:`register_clip_config`).
            Ignored for OpenAI-format files, whose architecture is read off the tensors.
        pretrained: a pretrained tag, ``"shipped"`` (the weights in ``lightning_clipes/weights/``), a path to an OpenAI ``.pt`` (TorchScript or state dict) or an
            open_clip checkpoint, or ``None`` for random weights.
        quick_gelu: ``None`` = automatic (OpenAI-format files use QuickGELU); ``False`` loads a plain
            state dict through open_clip with ``model_name``'s own activation.
    """
    # the run's seeded random stream is left as it was (the student's init); weights that are loaded are not drawn
    with torch.random.fork_rng(devices=[]), _SkipRandomInit() if pretrained is not None else contextlib.nullcontext():
        model, tok_name = _build(model_name, pretrained, quick_gelu)
    model = model.float().eval().requires_grad_(False)
    check_supported(model.visual)
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(cfg.get("mean") or OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(tok_name, context_length=model.context_length)
    return LoadedCLIP(model=model, tokenizer=tokenizer, mean=mean, std=std)
