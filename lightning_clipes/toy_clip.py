"""Train the package's tiny CLIP in the toy world (``clipes fit -c experiments/toy_clip.yaml``).

``ToyCLIP`` is an open_clip ``CLIP`` built from a registered config (``clipes-toy-ViT``: a ViT with
8-px patches, a 16×16 grid at 128 px and the class token as image feature, as OpenAI's CLIP; CLIP-ES
itself differentiates through the mean of the patch tokens either way), trained with open_clip's ``ClipLoss`` on
(image, caption) pairs that ``ToyCaptionDataModule`` draws from the toy world
(:mod:`lightning_clipes.data.toy_world`) at scene indices no dataset split uses. At the end of
``fit`` the weights are exported in the compact format that ``load_clip`` reads
(:func:`~lightning_clipes.components.clip_loader.compact_state_dict`: float16, and only the token
embedding rows of the world's vocabulary, the rest of open_clip's 49,408 rows held at zero).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from PIL import Image
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from lightning_clipes.components.clip_loader import WEIGHTS_DIR, compact_state_dict
from lightning_clipes.data.toy_world import TOY_BACKGROUNDS, TOY_CLASSES, render_scene

TOY_CLIP_NAME = "clipes-toy-ViT"
TOY_CLIP_WEIGHTS = WEIGHTS_DIR / f"{TOY_CLIP_NAME}.pt"  # what pretrained: shipped loads for this model
TOY_TEMPLATE = "a photo of a {}."  # the captions' own phrasing, the labeler's template for this world
FIRST_CLIP_INDEX = 10_000_000  # scenes from here on train the CLIP; the dataset splits use 0, 1, 2, ...
FIRST_VAL_INDEX = 20_000_000


def caption(labels: list[str], background: str, rng: np.random.Generator, p_background: float = 0.8) -> str:
    """``"a photo of a kite and a bird on sky."``: the objects in random order, the background word
    with probability ``p_background``."""
    names = [f"a {n}" for n in rng.permutation(labels)]
    objects = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    where = f" on {background}" if rng.random() < p_background else ""
    return f"a photo of {objects}{where}."


def world_token_ids(tokenizer) -> torch.Tensor:
    """Sorted ids of every token the captions and the world's prompts can use (start and end included)."""
    words = [*TOY_CLASSES, *TOY_BACKGROUNDS, "a photo of a and on , ."]
    tokens = tokenizer([caption(list(TOY_CLASSES[:2]), "water", np.random.default_rng(0), 1.0), *words])
    return torch.unique(tokens[tokens != 0])


def object_crop(scene, rng: np.random.Generator, min_side: float, out_size: int):
    """A square crop of the scene around a random object pixel, ``min_side``–1 of the image's side,
    resized to ``out_size``, with the classes it shows: those with at least 40 % of their visible
    pixels (and 16 pixels) inside. None when the crop shows none."""
    size = scene.mask.shape[0]
    ys, xs = np.nonzero(scene.mask)
    if len(ys) == 0:
        return None
    k = int(rng.integers(len(ys)))
    side = int(round(size * rng.uniform(min_side, 1.0)))
    top = int(np.clip(ys[k] - rng.integers(side), 0, size - side))
    left = int(np.clip(xs[k] - rng.integers(side), 0, size - side))
    window = scene.mask[top : top + side, left : left + side]
    full, inside = np.bincount(scene.mask.ravel(), minlength=256), np.bincount(window.ravel(), minlength=256)
    labels = [TOY_CLASSES[c - 1] for c in range(1, 1 + len(TOY_CLASSES))
              if full[c] and inside[c] >= max(16, 0.4 * full[c])]
    if not labels:
        return None
    crop = Image.fromarray(scene.image[top : top + side, left : left + side]).resize((out_size, out_size), Image.BILINEAR)
    return np.asarray(crop), labels


class ToyCaptionDataset(Dataset):
    """Scenes ``first_index … first_index + length - 1`` of the world ``seed`` with their captions.

    Items: ``(image (3, S, S) float32 normalised with CLIP's mean/std, tokens (context_length,) int64,
    present (num classes,) bool: the classes the image shows)``.
    Images go through JPEG (quality 95) as the dataset's files do. The first ``low_res_items`` items
    are drawn at ``low_res_size`` instead of ``image_size`` (a cheap first phase: 4x fewer tokens at half size).
    """

    def __init__(self, seed: int, first_index: int, length: int, image_size: int, tokenizer,
                 p_background: float = 0.8, low_res_size: int = 64, low_res_items: int = 0,
                 p_home: float = 0.8, home_weight: float = 10.0, p_crop: float = 0.0, crop_min: float = 0.3) -> None:
        self.seed, self.first_index, self.length = seed, first_index, length
        self.p_crop, self.crop_min = p_crop, crop_min
        self.p_home, self.home_weight = p_home, home_weight
        self.image_size, self.tokenizer, self.p_background = image_size, tokenizer, p_background
        self.low_res_size, self.low_res_items = low_res_size, low_res_items
        self.mean = np.array(OPENAI_DATASET_MEAN, np.float32) * 255
        self.std = np.array(OPENAI_DATASET_STD, np.float32) * 255

    def __len__(self) -> int:
        return self.length

    def image_and_caption(self, i: int) -> tuple[np.ndarray, list[str], str]:
        """Item ``i`` before encoding: (image (S, S, 3) uint8, the class names it shows, its caption)."""
        index = self.first_index + i
        size = self.low_res_size if i < self.low_res_items else self.image_size
        rng = np.random.default_rng([self.seed, index, 1])
        if self.p_crop > 0 and rng.random() < self.p_crop:
            scene = render_scene(self.seed, index, self.image_size, self.p_home, self.home_weight)
            cropped = object_crop(scene, rng, self.crop_min, size)
            if cropped is not None:
                image, labels = cropped
                return image, labels, caption(labels, scene.background, rng, self.p_background)
        scene = render_scene(self.seed, index, size, self.p_home, self.home_weight)
        return scene.image, scene.labels, caption(scene.labels, scene.background, rng, self.p_background)

    def __getitem__(self, i: int):
        image, labels, text = self.image_and_caption(i)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        rgb = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
        pixels = torch.from_numpy(np.ascontiguousarray(((rgb - self.mean) / self.std).transpose(2, 0, 1)))
        present = torch.zeros(len(TOY_CLASSES), dtype=torch.bool)
        present[[TOY_CLASSES.index(n) for n in labels]] = True
        return pixels, self.tokenizer([text])[0], present


class ToyCaptionDataModule(L.LightningDataModule):
    """(image, caption) batches from the toy world for CLIP training; nothing is written to disk.

    Args:
        seed: the world (the same as the dataset's ``seed``).
        image_size: side of the images (the world's 128 by default).
        num_samples: scenes per training epoch (a fresh scene each, until the epoch repeats).
        val_samples: held-out scenes for ``val/loss`` and ``val/zero_shot_precision``.
        batch_size, num_workers: the DataLoader's.
        p_background: how often a caption names the background.
        low_res_batches, low_res_size: the first ``low_res_batches`` training batches have images of
            ``low_res_size`` px (an 8×8 grid at 64 px instead of 16×16: about 4x cheaper steps).
        p_home, home_weight: co-occurrence of classes and backgrounds in the training stream (the
            world's own: 0.8 and 10; ``1/6`` and ``1`` draw backgrounds independently).
        p_crop, crop_min: share of training images that are square crops around an object
            (``crop_min``–1 of the side, captioned with the classes they show; see :func:`object_crop`).
        model_name: open_clip config whose tokenizer and context length to use.
    """

    def __init__(self, seed: int = 0, image_size: int = 128, num_samples: int = 100_000, val_samples: int = 512,
                 batch_size: int = 128, num_workers: int = 0, p_background: float = 0.8,
                 low_res_batches: int = 0, low_res_size: int = 64, p_home: float = 0.8, home_weight: float = 10.0,
                 p_crop: float = 0.0, crop_min: float = 0.3, model_name: str = TOY_CLIP_NAME) -> None:
        super().__init__()
        self.seed, self.image_size = seed, image_size
        self.num_samples, self.val_samples = num_samples, val_samples
        self.batch_size, self.num_workers, self.p_background = batch_size, num_workers, p_background
        self.low_res_batches, self.low_res_size = low_res_batches, low_res_size
        self.stream = {"p_home": p_home, "home_weight": home_weight, "p_crop": p_crop, "crop_min": crop_min}
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = ToyCaptionDataset(self.seed, FIRST_CLIP_INDEX, self.num_samples, self.image_size,
                                           self.tokenizer, self.p_background, self.low_res_size,
                                           self.low_res_batches * self.batch_size, **self.stream)
        self.val_set = ToyCaptionDataset(self.seed, FIRST_VAL_INDEX, self.val_samples, self.image_size,
                                         self.tokenizer, self.p_background)

    def train_dataloader(self) -> DataLoader:
        # in order: every index is a fresh random scene already
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


def class_token_mask(tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (T, T) attention mask that cuts the class token (position 0) off the patch tokens,
    both ways: it attends only to itself and no patch token attends to it."""
    mask = torch.zeros(tokens, tokens, dtype=dtype, device=device)
    mask[0, 1:] = float("-inf")
    mask[1:, 0] = float("-inf")
    return mask


def encode_image_tokens(visual: torch.nn.Module, images: torch.Tensor, keep: float = 1.0,
                        class_token_blocks: Optional[int] = None) -> torch.Tensor:
    """open_clip's ViT forward (class token or mean of the patch tokens, as the config's ``pool_type``),
    for any image size and with optional token dropout.

    The positional embedding is resized bilinearly to the grid as the labeler does (method §2; at
    the native grid it is unchanged). ``keep < 1`` keeps a random ``keep`` fraction of the patch
    tokens of each image (FLIP-style, training only). ``class_token_blocks = k`` lets the class
    token and the patch tokens see each other only in the last ``k`` blocks (CaiT-style class
    attention, training only; ``None``: in every block, open_clip's forward). (B, 3, H, W) -> (B, E)
    unnormalised.
    """
    x = visual.conv1(images)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    side = int(round(math.sqrt(pos.shape[0] - 1)))
    patch_pos = pos[1:]
    if grid != (side, side):
        patch_pos = F.interpolate(patch_pos.T.reshape(1, -1, side, side), size=grid, mode="bilinear",
                                  align_corners=False).reshape(pos.shape[1], -1).T
    x = x + patch_pos
    if keep < 1.0:
        n_keep = max(1, int(round(x.shape[1] * keep)))
        order = torch.rand(x.shape[0], x.shape[1], device=x.device).argsort(dim=1)[:, :n_keep]
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[2]))
    cls = (visual.class_embedding + pos[0]).to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    blocks = visual.transformer.resblocks
    if class_token_blocks is None or class_token_blocks >= len(blocks):
        x = visual.transformer(x)
    else:
        mask = class_token_mask(x.shape[1], x.dtype, x.device)
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=mask if i < len(blocks) - class_token_blocks else None)
    x = visual.ln_post(x)
    pooled = x[:, 0] if getattr(visual, "pool_type", "avg") == "tok" else x[:, 1:].mean(dim=1)
    return pooled @ visual.proj


@torch.no_grad()
def similarity_attention_init(visual: torch.nn.Module, gain: float = 1.4) -> None:
    """Key projection = query projection (both times ``gain``) in every block of the image tower.

    With independent query and key weights a fresh ViT attends almost uniformly, so every block
    adds the same image-wide average to every token; trained briefly, the tiny model keeps that
    habit and the background tokens end up carrying the objects' classes (the class maps light up
    the background). With ``W_k = W_q`` the attention logits start as ``(W_q z_i)·(W_q z_j)``, a
    similarity of the tokens, so tokens first pool with tokens like them (the same object).
    """
    for block in visual.transformer.resblocks:
        w = block.attn.in_proj_weight
        d = w.shape[1]
        w[:d] *= gain
        w[d : 2 * d] = w[:d]


@torch.no_grad()
def freeze_query_key_grads(visual: torch.nn.Module) -> None:
    """Zero the query and key parts of each image block's ``in_proj_weight`` gradient (and bias)."""
    for block in visual.transformer.resblocks:
        for p in (block.attn.in_proj_weight, block.attn.in_proj_bias):
            if p is not None and p.grad is not None:
                p.grad[: 2 * (p.shape[0] // 3)] = 0


@torch.no_grad()
def tie_query_key_grads(visual: torch.nn.Module) -> None:
    """Average the query and key parts of each image block's ``in_proj_weight`` gradient (and bias).

    Equal weights with equal gradients get equal AdamW updates (their moments stay equal too), so
    the projections stay exactly tied, as one shared parameter would be.
    """
    for block in visual.transformer.resblocks:
        for p in (block.attn.in_proj_weight, block.attn.in_proj_bias):
            if p is None or p.grad is None:
                continue
            d = p.shape[0] // 3
            mean = (p.grad[:d] + p.grad[d : 2 * d]) / 2
            p.grad[:d] = mean
            p.grad[d : 2 * d] = mean


class ToyCLIP(L.LightningModule):
    """A tiny open_clip CLIP trained contrastively in the toy world; exports its weights at the end of ``fit``.

    Args:
        model_name: registered open_clip config (``lightning_clipes/model_configs/<name>.json``).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up, then cosine decay to
            ``lr · min_lr_ratio`` at ``trainer.max_steps``; no weight decay on gains, biases,
            embeddings and the logit scale.
        token_keep: fraction of patch tokens kept per training image (1 = all).
        attention_init: ``"similarity"`` starts every image block with its key projection equal to
            its query projection (times ``attention_gain``), so tokens first attend to tokens like
            them instead of uniformly to all (see :func:`similarity_attention_init`); ``"default"``
            keeps open_clip's (PyTorch's) init.
        query_key: what training does to the image blocks' query and key projections: ``"free"``
            (ordinary training), ``"tied"`` (kept equal, their gradients averaged as for one shared
            weight: symmetric attention ``softmax((W z_i)·(W z_j))``) or ``"fixed"`` (kept at their
            similarity init: attention stays a similarity of the tokens as the blocks learn what
            the tokens hold). ``tied`` and ``fixed`` need ``attention_init: similarity``.
        class_token_blocks: in how many of the last image blocks the class token (the image feature
            the loss sees) exchanges attention with the patch tokens during training; ``null``: all
            (ordinary training). With ``1`` (CaiT-style class attention) the class token can learn
            the classes only from the last block's patch values, the path CLIP-ES's GradCAM reads,
            instead of gathering them in the early blocks. Training only: the exported model is a
            plain open_clip CLIP and the labeler runs it unmasked (method §2–3).
        export_path: where the compact weights go when ``fit`` ends (``null``: not exported; never
            under ``fast_dev_run``).
    """

    def __init__(self, model_name: str = TOY_CLIP_NAME, lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 30, min_lr_ratio: float = 0.05, token_keep: float = 1.0,
                 attention_init: str = "similarity", attention_gain: float = 2.0, query_key: str = "fixed",
                 class_token_blocks: Optional[int] = None, export_path: Optional[str] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.export_path = model_name, export_path
        self.lr, self.weight_decay, self.warmup_steps, self.min_lr_ratio = lr, weight_decay, warmup_steps, min_lr_ratio
        self.token_keep = token_keep
        if class_token_blocks is not None and class_token_blocks < 1:
            raise ValueError(f"class_token_blocks must be null or at least 1, got {class_token_blocks}.")
        self.class_token_blocks = class_token_blocks
        self.clip = open_clip.create_model(model_name, pretrained=None)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        if attention_init == "similarity":
            similarity_attention_init(self.clip.visual, attention_gain)
        elif attention_init != "default":
            raise ValueError(f"attention_init must be 'similarity' or 'default', got {attention_init!r}.")
        if query_key not in ("free", "tied", "fixed"):
            raise ValueError(f"query_key must be 'free', 'tied' or 'fixed', got {query_key!r}.")
        if query_key != "free" and attention_init != "similarity":
            raise ValueError(f"query_key: {query_key} needs attention_init: similarity (query and key start equal).")
        self.query_key = query_key
        with torch.no_grad():  # rows the world never uses stay zero, so the exported file can leave them out
            unused = torch.ones(self.clip.token_embedding.weight.shape[0], dtype=torch.bool)
            unused[world_token_ids(self.tokenizer)] = False
            self.clip.token_embedding.weight[unused] = 0
        self.loss = ClipLoss()

    def features(self, images: torch.Tensor, tokens: torch.Tensor, keep: float = 1.0):
        """Unit image and text features, (B, E) each."""
        img = F.normalize(encode_image_tokens(self.clip.visual, images, keep, self.class_token_blocks), dim=-1)
        txt = F.normalize(self.clip.encode_text(tokens), dim=-1)
        return img, txt

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, tokens, _ = batch
        img, txt = self.features(images, tokens, self.token_keep)
        scale = self.clip.logit_scale.exp()
        loss = self.loss(img, txt, scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.query_key == "tied":
            tie_query_key_grads(self.clip.visual)
        elif self.query_key == "fixed":
            freeze_query_key_grads(self.clip.visual)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():  # as open_clip's training: the scale stays at or below 100
            self.clip.logit_scale.clamp_(0, math.log(100))

    def on_validation_epoch_start(self) -> None:
        text = self.tokenizer([TOY_TEMPLATE.format(c) for c in TOY_CLASSES]).to(self.device)
        self._class_text = F.normalize(self.clip.encode_text(text), dim=-1)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, tokens, present = batch
        img, txt = self.features(images, tokens)
        self.log("val/loss", self.loss(img, txt, self.clip.logit_scale.exp()), batch_size=len(images))
        # zero-shot labels: are an image's n best classes (prompt "a photo of a {}.") its n labels?
        scores = img @ self._class_text.T
        hits = []
        for row, labels in zip(scores, present):
            top = row.topk(int(labels.sum())).indices
            hits.append(float(labels[top].float().mean()))
        self.log("val/zero_shot_precision", float(np.mean(hits)), batch_size=len(images))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.clip.named_parameters():
            plain = p.ndim < 2 or "embedding" in name or "logit_scale" in name
            # fixed query/key rows get no gradient; weight decay would still shrink them
            plain = plain or (self.query_key == "fixed" and "visual" in name and "in_proj" in name)
            (no_decay if plain else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.98), eps=1e-6)
        total = max(1, int(self.trainer.max_steps) if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            t = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, factor), "interval": "step"}}

    def export(self, path: str) -> Path:
        """Write the compact weights (float16, world's token rows only) that ``load_clip`` reads."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(compact_state_dict(self.clip.state_dict(), self.model_name), tmp)
        tmp.replace(path)
        return path

    def on_fit_end(self) -> None:
        if self.export_path and not self.trainer.fast_dev_run and self.trainer.is_global_zero:
            print(f"ToyCLIP: weights written to {self.export(self.export_path)}")
