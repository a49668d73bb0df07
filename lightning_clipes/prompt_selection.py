"""Sharpness-based prompt selection (CLIP-ES, method §1; the paper's Eq. 9): rank prompt templates.

For a template, every class name goes into it and CLIP scores each image against all dataset classes:
``p = softmax(logit_scale · cos(image, class))`` over the C foreground classes. On an image with two or
more labels (its target classes T), ``sharpness = var(p[T]) / mean(p[T])`` with the population variance
(ddof = 0); a template's sharpness is the mean over those images. Lower is better: the template spreads
CLIP's score evenly over the classes that are really there. CLIP-ES chose ``"a clean origami {}."``
this way. The chosen template (or several, averaged as in method §1) goes into the labeler's
``templates`` list.

The command builds only the data: any lightning_clipes DataModule given as in the configs
(``--data.class_path …`` or ``-c CONFIG``), scored on its ``split``. The CLIP (``model_name``,
``pretrained``, ``quick_gelu``) and the class prompt names come from, first to last: this command's
own ``--model_name/--pretrained/--quick_gelu/--class_names``; the config's labeler (``model`` when it
is a ``CLIPESLabeler``, else ``data.labeler``), never built; then ViT-B-16, ``openai``, automatic,
and the data's prompt names (else ``voc``). Other LightningCLI keys (``trainer``, ``seed_everything``,
``ckpt_path``) are accepted and ignored, so every experiment config works as it is:

    clipes select-prompt -c experiments/voc_pseudo_labels.yaml --data.root DIR/VOC2012 \\
        --pretrained PATH/ViT-B-16.pt --output outputs/prompt_ranking.csv
"""
from __future__ import annotations

import csv
import sys
import warnings
from importlib import import_module
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lightning_clipes.components.clip_loader import LoadedCLIP, load_clip
from lightning_clipes.components.prompts import CLIPES_TEMPLATE, check_templates, create_vocabulary, encode_prompts


def default_templates() -> list[str]:
    """CLIP's 80 ImageNet templates (``open_clip.zero_shot_metadata``) as ``"{}"`` strings, then CLIP-ES's."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    templates = [t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES]
    return check_templates(list(dict.fromkeys([*templates, CLIPES_TEMPLATE])))


def read_templates(path: Union[str, Path]) -> list[str]:
    """Templates from a text file: one per line with one ``{}``; blank lines and ``#`` lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Template file {path} not found; --templates takes a text file, one template a line.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    try:
        return check_templates(templates)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


@torch.no_grad()
def image_features(clip: LoadedCLIP, images: Sequence[np.ndarray], batch_size: int = 32) -> Tensor:
    """CLIP's ordinary image embedding with open_clip's eval preprocessing for the model (shortest side
    resized to the model's input size, bicubic, center crop, CLIP mean/std).

    ``images``: (H, W, 3) uint8 RGB arrays. Returns (N, E) float32 on CPU, unit rows.
    """
    model = clip.model
    cfg = open_clip.get_model_preprocess_cfg(model)
    transform = open_clip.image_transform(
        model.visual.image_size, is_train=False, mean=clip.mean, std=clip.std,
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images[start:start + batch_size]])
        feats.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    embed_dim = model.text_projection.shape[-1]
    return torch.cat(feats) if feats else torch.zeros(0, embed_dim)


def template_sharpness(
    image_feats: Tensor, labels: Sequence[Sequence[int]], text_feats: Tensor, logit_scale: float
) -> tuple[float, int]:
    """Mean sharpness of one template over the images with two or more (distinct) labels.

    Args:
        image_feats: (N, E) image embeddings; text_feats: (C, E), one row per dataset class. Both are
            L2-normalised here, so the logits are ``logit_scale`` · cosine.
        labels: the 0-based target classes of each of the N images.
        logit_scale: CLIP's ``exp(logit_scale)`` (100 for OpenAI's weights).
    Returns:
        (sharpness, images used): sharpness_i = var(p[T_i]) / mean(p[T_i]), population variance
        (ddof = 0), p = softmax over all C classes; images with fewer than two labels are skipped.
    """
    if len(labels) != image_feats.shape[0]:
        raise ValueError(f"{image_feats.shape[0]} image features but {len(labels)} label lists.")
    num_classes = text_feats.shape[0]
    img = F.normalize(image_feats.detach().double().cpu(), dim=-1)
    txt = F.normalize(text_feats.detach().double().cpu(), dim=-1)
    probs = (float(logit_scale) * img @ txt.T).softmax(dim=-1)
    scores = []
    for i, labs in enumerate(labels):
        targets = list(dict.fromkeys(int(c) for c in labs))
        if len(targets) < 2:
            continue
        if min(targets) < 0 or max(targets) >= num_classes:
            raise ValueError(f"Image {i} has labels {targets} outside the {num_classes} classes of the text features.")
        p = probs[i, targets]
        scores.append((p.var(unbiased=False) / p.mean()).item())
    if not scores:
        raise ValueError(
            "No image has two or more labels; sharpness compares CLIP's scores of the classes present in "
            "multi-label images. Use a split with multi-label images (VOC train, COCO train)."
        )
    return float(np.mean(scores)), len(scores)


def rank_templates_on_features(
    clip: LoadedCLIP, image_feats: Tensor, labels: Sequence[Sequence[int]],
    class_prompt_names: Sequence[str], templates: Sequence[str],
) -> list[dict[str, Any]]:
    """:func:`rank_templates` on precomputed image embeddings (N, E)."""
    templates = check_templates(templates)
    scale = float(clip.model.logit_scale.exp().item())
    rows = []
    with tqdm(total=len(templates), desc="templates", disable=None, file=sys.stderr) as bar:  # closed on errors too
        for template in templates:
            text = encode_prompts(clip.model, clip.tokenizer, list(class_prompt_names), [template])
            sharpness, used = template_sharpness(image_feats, labels, text, scale)
            rows.append({"template": template, "sharpness": sharpness, "images": used})
            bar.update()
    return sorted(rows, key=lambda r: r["sharpness"])  # stable: ties keep the candidates' order


def rank_templates(
    clip: LoadedCLIP, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
    class_prompt_names: Sequence[str], templates: Sequence[str], batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Score every template on the images; rows ``{template, sharpness, images}``, lowest sharpness first."""
    feats = image_features(clip, images, batch_size)
    return rank_templates_on_features(clip, feats, labels, class_prompt_names, templates)


def format_table(rows: Sequence[dict[str, Any]], top: Optional[int] = None) -> str:
    """A markdown table (rank, sharpness, template) of the first ``top`` rows (all when None)."""
    shown = rows[:top] if top is not None else rows
    lines = ["| rank | sharpness | template |", "| ---: | ---: | --- |"]
    for rank, row in enumerate(shown, 1):
        template = row["template"].replace("|", r"\|")  # a bare | would split the markdown cell
        lines.append(f"| {rank} | {row['sharpness']:.6g} | {template} |")
    if len(shown) < len(rows):
        lines.append(f"\n({len(rows) - len(shown)} more rows)")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: Union[str, Path]) -> None:
    """Columns ``rank, sharpness, images, template`` (sharpness with full precision)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "sharpness", "images", "template"])
        for rank, row in enumerate(rows, 1):
            writer.writerow([rank, repr(row["sharpness"]), row["images"], row["template"]])


# ---------------------------------------------------------------------------------------- command
_IGNORED_KEYS = ("seed_everything", "trainer", "ckpt_path")  # LightningCLI keys a shared config may hold


def build_parser():
    """The ``clipes select-prompt`` parser: ``data`` as in the YAML configs, plus the selection's own options."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="clipes select-prompt", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="A lightning_clipes YAML config; its data block is used.")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True,
                                  help="The data, as in the configs; its split is scored.")
    parser.add_argument("--model", type=Optional[L.LightningModule], default=None,
                        help="Never built. A CLIPESLabeler here (or as data.labeler) gives the CLIP defaults.")
    for key in _IGNORED_KEYS:
        parser.add_argument(f"--{key}", type=Any, default=None, help="Ignored (so LightningCLI configs parse).")
    parser.add_argument("--model_name", type=Optional[str], default=None,
                        help="open_clip model name (default: the config's labeler, else ViT-B-16).")
    parser.add_argument("--pretrained", type=Optional[str], default=None,
                        help="CLIP weights, tag or file, as the labeler's (default: the config's labeler, else openai).")
    parser.add_argument("--quick_gelu", type=Optional[bool], default=None,
                        help="As the labeler's (default: the config's labeler, else automatic).")
    parser.add_argument("--class_names", type=Optional[Union[str, list[str]]], default=None,
                        help="Prompt names: voc, coco or a list (default: the config's labeler, else the data's, else voc).")
    parser.add_argument("--templates", type=Optional[str], default=None,
                        help="Candidates: a file, one template with one {} per line (default: CLIP's 80 ImageNet "
                             "templates and 'a clean origami {}.').")
    parser.add_argument("--max_images", type=Optional[int], default=1000,
                        help="Score the first N images with two or more labels (null: all).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per CLIP forward.")
    parser.add_argument("--device", type=Optional[str], default=None, help="torch device (default: cuda when available).")
    parser.add_argument("--output", type=Optional[str], default=None, help="Write the ranked rows to this CSV.")
    parser.add_argument("--top", type=Optional[int], default=None,
                        help="Print only the best K rows (all are ranked and written to --output).")
    return parser


def _labeler_settings(cfg) -> dict:
    """init_args of the config's labeler: ``model`` when it is a CLIPESLabeler, else ``data.init_args.labeler``."""
    from lightning_clipes.labeler import CLIPESLabeler

    for block in (cfg.get("model"), cfg.data.init_args.get("labeler") if cfg.data.get("init_args") else None):
        if block is None or not isinstance(block.get("class_path"), str):
            continue
        module, _, name = block.class_path.rpartition(".")
        cls = getattr(import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, CLIPESLabeler):
            return block.init_args.as_dict() if block.get("init_args") is not None else {}
    return {}


def _multi_label_images(dataset, indices: list[int], max_images: Optional[int], batch_size: int, num_workers: int):
    """Yield readable items of ``indices`` in order, at most ``max_images``, in lists of ``batch_size``."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=list)
    taken = 0
    for items in loader:
        ok = [it for it in items if it.get("error") is None and it.get("image") is not None]
        for it in items:
            if it.get("error") is not None:
                warnings.warn(f"Skipping unreadable image {it['id']}: {it['error']}", stacklevel=2)
        if max_images is not None:
            ok = ok[: max_images - taken]
        taken += len(ok)
        if ok:
            yield ok
        if max_images is not None and taken >= max_images:
            return


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """``clipes select-prompt``: rank templates by sharpness on the data's split; prints a table, returns the rows."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.max_images is not None and cfg.max_images < 1:
        raise ValueError(f"--max_images must be positive or null (all images), got {cfg.max_images}.")
    labeler = _labeler_settings(cfg)
    # Only the data is built: not the model, and not a labeler nested in the data (it would load a CLIP).
    cfg.model = None
    if cfg.data.get("init_args") is not None and "labeler" in cfg.data.init_args:
        cfg.data.init_args.labeler = None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    dm = instantiate(cfg).data
    if not hasattr(dm, "build_dataset") or not hasattr(dm, "split"):
        raise TypeError(f"{type(dm).__name__} has no build_dataset(split)/split; use a lightning_clipes labeler or "
                        "segmentation DataModule (VOCDataModule, ...).")
    templates = read_templates(cfg.templates) if cfg.templates else default_templates()

    source_names = getattr(getattr(dm, "source", None), "prompt_names", None)
    names = create_vocabulary(cfg.class_names or labeler.get("class_names") or source_names or "voc")
    data_names = getattr(dm, "class_names", None)
    if data_names is not None and len(data_names) != len(names):
        raise ValueError(f"The data has {len(data_names)} classes but the vocabulary has {len(names)}; set "
                         "--class_names to one prompt name per dataset class, in the same order.")

    dm.prepare_data()
    dataset = dm.build_dataset(dm.split)
    all_labels = getattr(dataset, "labels", None) or [dataset[i]["labels"] for i in range(len(dataset))]
    multi = [i for i, labs in enumerate(all_labels) if len(set(labs)) >= 2]
    if not multi:
        raise ValueError(f"No image of split {dm.split!r} has two or more labels ({len(dataset)} images); sharpness "
                         "is measured on multi-label images. Choose a split with some (--data.split).")

    model_name = cfg.model_name or labeler.get("model_name") or "ViT-B-16"
    pretrained = cfg.pretrained if cfg.pretrained is not None else labeler.get("pretrained", "openai")
    quick_gelu = cfg.quick_gelu if cfg.quick_gelu is not None else labeler.get("quick_gelu")
    if pretrained is None:
        warnings.warn("Random CLIP weights (pretrained=None): the ranking is meaningless.", stacklevel=2)
    clip = load_clip(model_name, pretrained, quick_gelu)
    clip.model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    feats, labels = [], []
    for items in _multi_label_images(dataset, multi, cfg.max_images, cfg.batch_size, getattr(dm, "num_workers", 0)):
        feats.append(image_features(clip, [it["image"] for it in items], cfg.batch_size))
        labels.extend(it["labels"] for it in items)
    if not feats:
        raise ValueError(f"None of the {len(multi)} multi-label images of split {dm.split!r} could be read.")
    print(f"select-prompt: {len(templates)} templates on {len(labels)} multi-label images of split {dm.split!r} "
          f"({len(multi)} of {len(dataset)} have >= 2 labels), {len(names)} classes, CLIP {model_name} ({pretrained})",
          file=sys.stderr)
    rows = rank_templates_on_features(clip, torch.cat(feats), labels, names, templates)
    print(format_table(rows, cfg.top))
    if cfg.output:
        write_csv(rows, cfg.output)
        print(f"select-prompt: ranking written to {cfg.output}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
