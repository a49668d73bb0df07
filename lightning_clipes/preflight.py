"""Checks a run's configuration before anything heavy starts: data folders, split files, CLIP weights,
checkpoints and downloads, each reported in one line with the flag that fixes it.

``clipes`` runs :func:`preflight` on the parsed configuration, before CLIP is loaded or any process is
started, so that a missing VOC root is reported in a second, not after every DDP process has built
ViT-B/16, and a download that cannot succeed is not retried for half a minute first.
"""
from __future__ import annotations

import os
import socket
from importlib import import_module
from pathlib import Path
from typing import Any, Optional

NULL_STRINGS = ("None", "null", "none", "Null", "NULL")


class ConfigError(Exception):
    """A problem with the run's configuration, explained in one line (what, which option or file, what to do)."""


def _get(ns: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if ns is None:
            return default
        ns = ns.get(key) if hasattr(ns, "get") else getattr(ns, key, None)
    return default if ns is None else ns


def _class(path: Optional[str]) -> Optional[type]:
    if not path or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return None


def labeler_configs(config: Any) -> list[tuple[Any, str]]:
    """The labeler's ``init_args`` in a run's config with the flag prefix that reaches them: the model
    (``clipes predict/validate``) or ``data.labeler`` (``clipes fit``)."""
    from lightning_clipes.labeler import CLIPESLabeler

    found = []
    model = _get(config, "model")
    if _class(_get(model, "class_path")) is not None and issubclass(_class(_get(model, "class_path")), CLIPESLabeler):
        found.append((_get(model, "init_args"), "--model."))
    labeler = _get(config, "data.init_args.labeler")
    if labeler is not None and _get(labeler, "class_path"):
        found.append((_get(labeler, "init_args"), "--data.labeler.init_args."))
    return found


def normalise_nulls(config: Any) -> None:
    """``--data.labeler.init_args.pretrained null`` reaches the namespace as the string 'None' (jsonargparse
    reads nested subclass arguments as text): make it None, as in YAML."""
    for init_args, _ in labeler_configs(config):
        if init_args is not None and init_args.get("pretrained") in NULL_STRINGS:
            init_args["pretrained"] = None


def check_clip_weights(init_args: Any, flag: str) -> None:
    """The weights a labeler asks for exist, or can be downloaded."""
    pretrained, model_name = init_args.get("pretrained"), init_args.get("model_name", "ViT-B-16")
    if pretrained is None:
        return
    if pretrained == "shipped":  # clip_loader.SHIPPED, not imported here: it loads open_clip
        from lightning_clipes.components.clip_loader import shipped_weights

        try:
            shipped_weights(model_name)
        except FileNotFoundError as err:
            raise ConfigError(f"{flag}pretrained shipped: {err}") from None
        return
    path = Path(os.path.expanduser(str(pretrained)))
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"{flag}pretrained {path} is a folder; give the weights file (e.g. ViT-B-16.pt) in it.")
        return
    import open_clip

    looks_like_path = os.sep in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if looks_like_path:
        raise ConfigError(f"CLIP weights {path} not found: set {flag}pretrained to the weights file (CLIP-ES uses "
                          f"OpenAI's ViT-B-16.pt), to an open_clip tag such as openai, or to null for random weights.")
    if model_name in open_clip.list_models() and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ConfigError(f"{flag}pretrained {pretrained!r} is neither a file nor a pretrained tag of {model_name} "
                          f"(tags: {tags}); give a weights file, a tag, or null for random weights.")
    if model_name in open_clip.list_models() and not _open_clip_cached(model_name, pretrained) and not reachable("huggingface.co"):
        raise ConfigError(f"{model_name} weights {pretrained!r} are not in the download cache and huggingface.co cannot "
                          f"be reached: download them once on a machine with network access, or set {flag}pretrained "
                          "to a local weights file (e.g. ViT-B-16.pt).")


def _open_clip_cached(model_name: str, tag: str) -> bool:
    """open_clip's download of ``tag`` is already in the Hugging Face cache (or OpenAI's URL cache)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/model/' (default file names) or 'org/model/file.bin'
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names):
            return True
    url = cfg.get("url", "")
    return bool(url) and (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)).is_file()


def check_encoder_weights(config: Any) -> None:
    """A student's ImageNet encoder is in smp's cache, or huggingface.co answers."""
    model = _get(config, "model")
    from lightning_clipes.student import SegmentationStudent

    cls = _class(_get(model, "class_path"))
    if cls is None or not issubclass(cls, SegmentationStudent):
        return
    init = _get(model, "init_args")
    name, weights = _get(init, "encoder_name"), _get(init, "encoder_weights")
    if weights is None or name is None or str(weights) in NULL_STRINGS:
        return
    import segmentation_models_pytorch as smp

    spec = smp.encoders.encoders.get(name, {}).get("pretrained_settings", {}).get(weights)
    if spec is None:
        return  # smp's own error names the valid encoders and tags
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec["repo_id"], "model.safetensors", revision=spec["revision"])
    if not isinstance(cached, str) and not reachable("huggingface.co"):
        raise ConfigError(f"The {weights!r} weights of encoder {name!r} are not in the Hugging Face cache and "
                          "huggingface.co cannot be reached: run once with network access (they are cached in "
                          "~/.cache/huggingface), or set --model.encoder_weights null to start from random weights.")


def check_data(config: Any, subcommand: str) -> None:
    """The data source's folders and split files exist (datasets the package writes itself are skipped)."""
    data = _get(config, "data")
    cls = _class(_get(data, "class_path"))
    init = _get(data, "init_args")
    if cls is None or init is None:
        return
    from lightning_clipes.data import sources

    source = None
    if _get(init, "source") is not None:
        src_cls = _class(_get(init, "source.class_path"))
        if src_cls is not None:
            args = {k: v for k, v in dict(_get(init, "source.init_args") or {}).items()}
            try:
                source = src_cls(**args)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{err} (--data.source.init_args)") from err
    elif _get(init, "root") is not None and "Synthetic" not in cls.__name__ and "Toy" not in cls.__name__:
        source = sources.VOCSource(_get(init, "root"))
    if source is None:
        return
    splits = [_get(init, "split")]
    if subcommand == "fit":
        splits.append(_get(init, "val_split"))
    elif subcommand in ("test", "predict") and _get(init, "val_split") is not None:
        splits = [_get(init, "test_split") or _get(init, "val_split")]
    elif subcommand == "validate" and _get(init, "val_split") is not None:
        splits = [_get(init, "val_split")]
    for split in dict.fromkeys(s for s in splits if s):
        try:
            source.check(split)
        except (OSError, ValueError) as err:
            raise ConfigError(str(err)) from err


def check_checkpoint(config: Any) -> None:
    ckpt = _get(config, "ckpt_path")
    if ckpt and str(ckpt) not in ("last", "best", "hpc", "registry") and not Path(os.path.expanduser(str(ckpt))).is_file():
        raise ConfigError(f"Checkpoint {ckpt} not found: set --ckpt_path to a .ckpt file of this run "
                          "(e.g. outputs/…/checkpoints/last.ckpt).")


def preflight(config: Any, subcommand: str) -> None:
    """Run every check; raise :class:`ConfigError` for the first problem."""
    normalise_nulls(config)
    check_checkpoint(config)
    check_data(config, subcommand)
    for init_args, flag in labeler_configs(config):
        if init_args is not None:
            check_clip_weights(init_args, flag)
    if subcommand == "fit" or not _get(config, "ckpt_path"):
        check_encoder_weights(config)


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """A TCP connection to ``host:port`` opens within ``timeout`` seconds (HF_HUB_OFFLINE=1 says no)."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False
