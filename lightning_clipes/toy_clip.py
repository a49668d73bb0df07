"""Train the package's tiny CLIP in the toy world (``clipes fit -c experiments/toy_clip.yaml``).

``ToyCLIP`` is an open_clip ``CLIP`` built from a registered config (``clipes-toy-ViT``: a ViT with
8-px patches, a 16×16 grid at 128 px and the class token as image feature, as OpenAI's CLIP; CLIP-ES
itself differentiates through the mean of the patch tokens either way), trained with open_clip's
``ClipLoss`` on (image, caption) pairs that :class:`~lightning_clipes.data.toy_captions.ToyCaptionDataModule`
draws from the toy world at scene indices no dataset split uses. At the end of ``fit`` the weights
are exported in the compact format that ``load_clip`` reads
(:func:`~lightning_clipes.components.clip_loader.compact_state_dict`: float16, and only the token
embedding rows of the world's vocabulary, the rest of open_clip's 49,408 rows held at zero).
"""
from __future__ import annotations

import math
from typing import Optional

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.optim.lr_scheduler import LambdaLR

from lightning_clipes.components.clip_loader import compact_state_dict, load_clip
from lightning_clipes.components.provenance import write_weights
from lightning_clipes.data.toy_captions import TOY_CLIP_NAME, TOY_TEMPLATE, world_token_ids
from lightning_clipes.data.toy_scenes import TOY_CLASSES


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
        init_weights: start from these weights instead of a fresh init (a file :func:`load_clip` reads,
            e.g. the export of an earlier phase; ``"shipped"``: the package's), for a second phase
            with other settings; the learning-rate schedule starts again (warm-up, then cosine).
        export_path: where the compact weights go when ``fit`` ends (``null``: not exported; never
            under ``fast_dev_run``).
    """

    def __init__(self, model_name: str = TOY_CLIP_NAME, lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 30, min_lr_ratio: float = 0.05, token_keep: float = 1.0,
                 attention_init: str = "similarity", attention_gain: float = 2.0, query_key: str = "fixed",
                 class_token_blocks: Optional[int] = None, init_weights: Optional[str] = None,
                 export_path: Optional[str] = None) -> None:
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
        if init_weights is not None:
            try:
                start = load_clip(model_name, init_weights).model
            except FileNotFoundError as err:
                raise FileNotFoundError(f"init_weights: {init_weights} not found. Point --model.init_weights at an "
                                        "exported toy CLIP (a run's export_path) or use 'shipped'.") from err
            self.clip.load_state_dict(start.state_dict())
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

    def export(self, path: str) -> str:
        """Write the compact weights (float16, world's token rows only) that ``load_clip`` reads, with the
        software and processor they were trained on (``"trained_with"``); returns a line saying where, and
        whether the tensors equal those of the file replaced (:func:`~lightning_clipes.components.provenance.write_weights`)."""
        return write_weights(path, compact_state_dict(self.clip.state_dict(), self.model_name), self.device)

    def on_fit_end(self) -> None:
        if self.export_path and not self.trainer.fast_dev_run and self.trainer.is_global_zero:
            print(f"ToyCLIP: {self.export(self.export_path)}")
