"""Residual-stream tokens of captioned images, tagged by token type: what the SAEs train on.

For each ShareGPT4V-format record, two forward passes (as in the paper):

1. **image + question + caption**: ``format_prompt(question)`` followed by the caption. The image
   tokens are kept (type ``image``) and so are the caption tokens (``text_in_context``); the
   template tokens around them (BOS, ``[INST]``, the question, ``[/INST]``) are dropped. Their
   positions come from the tokenizer and the image-token mask of the same batch, so no extra
   forward pass is needed to find them.
2. **caption alone**: BOS + caption, without image; the caption tokens are ``text_only``.

Both passes trace every requested layer at once (``layer`` = input of decoder block ``layer``)
and stop after the deepest one. Batches are right-padded, so a caption can be cut at
``max_caption_tokens`` by dropping trailing columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from lineofsight.cli import UserError
from lineofsight.hooks import TraceDict
from lineofsight.models import format_prompt, image_token_mask, residual_site
from lineofsight.prompts import CAPTION_QUESTION

__all__ = ["TOKEN_TYPES", "Harvester", "ImageLoader", "TokenBatch", "record_batches"]

TOKEN_TYPES: tuple[str, ...] = ("image", "text_in_context", "text_only")
"""Token-type codes: index in this tuple (``image`` = 0, ``text_in_context`` = 1, ``text_only`` = 2)."""


@dataclasses.dataclass
class TokenBatch:
    """Harvested tokens, flat over the batch: ``acts [N, n_layers, D]``, ``token_type [N]`` (uint8 code),
    ``sample [N]`` (the record's index given by the caller), ``token_id [N]`` and ``type_index [N]``
    (the token's rank among its record's tokens of the same type: the j-th image token, the j-th
    caption token)."""

    acts: torch.Tensor
    token_type: torch.Tensor
    sample: torch.Tensor
    token_id: torch.Tensor
    type_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.token_type.shape[0])

    @staticmethod
    def cat(batches: Sequence[TokenBatch]) -> TokenBatch:
        return TokenBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(TokenBatch)))

    @staticmethod
    def empty(n_layers: int, d_model: int, dtype: torch.dtype = torch.float32) -> TokenBatch:
        """No tokens (``acts [0, n_layers, d_model]``): what a shard of unreadable records holds."""
        long = torch.zeros(0, dtype=torch.long)
        return TokenBatch(torch.zeros(0, n_layers, d_model, dtype=dtype), torch.zeros(0, dtype=torch.uint8), long,
                          long.clone(), long.clone())

    def select(self, index: torch.Tensor) -> TokenBatch:
        return TokenBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(TokenBatch)))

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TokenBatch)}


class Harvester:
    """Reads ``layers`` of ``model`` over records; see the module docstring.

    ``types`` limits which token types are kept (and skips the caption-only pass when
    ``text_only`` is not among them).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        layers: Sequence[int],
        *,
        question: str = CAPTION_QUESTION,
        max_caption_tokens: int = 128,
        types: Sequence[str] = TOKEN_TYPES,
        save_dtype: torch.dtype = torch.float32,
    ) -> None:
        bad = sorted(set(types) - set(TOKEN_TYPES))
        if bad:
            raise UserError(f"unknown token type(s) {', '.join(bad)}; valid: {', '.join(TOKEN_TYPES)}")
        self.model, self.processor, self.layers = model, processor, list(layers)
        self.sites = [residual_site(model, layer) for layer in self.layers]
        self.question, self.max_caption_tokens = question, max_caption_tokens
        self.types = tuple(t for t in TOKEN_TYPES if t in types)
        self.save_dtype = save_dtype
        self.tok = processor.tokenizer
        self.prompt = format_prompt(processor, question)
        self.n_prompt = len(self.tok(self.prompt)["input_ids"])  # prompt with one image placeholder
        self.n_special = len(self.tok("")["input_ids"])  # BOS (or nothing) before a bare caption
        self.device = next(model.parameters()).device

    # ---- positions -----------------------------------------------------------------------------

    def check_boundary(self, caption: str) -> None:
        """The tokens of prompt + caption must start with the prompt's own tokens, or the caption
        positions would be off; raises :class:`UserError` naming the tokenizer otherwise."""
        full = self.tok(self.prompt + " " + caption)["input_ids"]
        alone = self.tok(self.prompt)["input_ids"]
        if full[: len(alone)] != alone:
            raise UserError(
                f"{type(self.tok).__name__} merges the prompt's last token with the caption; "
                "cannot locate caption tokens"
            )

    def _run(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad(), TraceDict(self.model, self.sites, retain_input=True, retain_output=False,
                                        stop=True) as td:
            self.model(**inputs, use_cache=False)
        return [td[site].input for site in self.sites]

    def _right_padded(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        side = self.tok.padding_side
        self.tok.padding_side = "right"
        try:
            if "images" in kwargs:
                out = self.processor(return_tensors="pt", padding=True, **kwargs)
            else:
                out = self.tok(kwargs["text"], return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = side
        return {k: v.to(self.device) for k, v in out.items()}

    # ---- harvesting ----------------------------------------------------------------------------

    def __call__(self, captions: Sequence[str], images: Sequence[Any], sample_ids: Sequence[int]) -> TokenBatch:
        """Tokens of one batch of (caption, image) pairs; ``sample_ids`` tag their tokens."""
        parts: list[TokenBatch] = []
        if "image" in self.types or "text_in_context" in self.types:
            parts.append(self._with_image(captions, images, sample_ids))
        if "text_only" in self.types:
            parts.append(self.caption_only(captions, sample_ids))
        return TokenBatch.cat(parts)

    def _with_image(self, captions: Sequence[str], images: Sequence[Any], sample_ids: Sequence[int]) -> TokenBatch:
        inputs, keep, kind = self.prepare_with_image(captions, images)
        return self._gather(self._run(inputs), keep, kind, inputs["input_ids"], sample_ids)

    def prepare_with_image(
        self, captions: Sequence[str], images: Sequence[Any]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Right-padded model inputs of pass 1, cut after the last kept position, with the kept
        positions ``[B, T]`` and their type codes ``[B, T]`` (-1 where not kept). The caption
        positions are kept whenever ``text_in_context`` is asked for; the codes say which is which."""
        inputs = self._right_padded(text=[self.prompt + " " + c for c in captions], images=list(images))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
        img = image_token_mask(ids, self.model)
        keep = torch.zeros_like(attn)
        kind = torch.full_like(ids, -1)
        for row in range(ids.shape[0]):
            start = self.n_prompt + int(img[row].sum()) - 1  # first caption position
            end = min(int(attn[row].sum()), start + self.max_caption_tokens)
            if "text_in_context" in self.types:
                keep[row, start:end] = True
                kind[row, start:end] = TOKEN_TYPES.index("text_in_context")
        if "image" in self.types:
            keep |= img
            kind[img] = TOKEN_TYPES.index("image")
        width = int(keep.nonzero()[:, 1].max()) + 1 if keep.any() else 1
        inputs = {k: (v[:, :width] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
        return inputs, keep[:, :width], kind[:, :width]

    def caption_only(self, captions: Sequence[str], sample_ids: Sequence[int]) -> TokenBatch:
        """Pass 2: BOS + caption without image; the caption tokens, typed ``text_only``."""
        inputs = self._right_padded(text=list(captions))
        ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
        keep = attn.clone()
        keep[:, : self.n_special] = False
        keep[:, self.n_special + self.max_caption_tokens :] = False
        width = self.n_special + self.max_caption_tokens
        inputs = {k: v[:, :width] for k, v in inputs.items()}
        kind = torch.full_like(ids, TOKEN_TYPES.index("text_only"))
        return self._gather(self._run(inputs), keep[:, :width], kind[:, :width], ids[:, :width], sample_ids)

    def _gather(self, resid: list[torch.Tensor], keep: torch.Tensor, kind: torch.Tensor, ids: torch.Tensor,
                sample_ids: Sequence[int]) -> TokenBatch:
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        acts = torch.stack([r[keep] for r in resid], 1).to(self.save_dtype).cpu()
        samples = torch.as_tensor(list(sample_ids), dtype=torch.long)[rows.cpu()]
        rank = torch.zeros_like(ids)
        for code in kind[keep].unique().tolist():
            same = keep & (kind == code)
            rank = torch.where(same, same.long().cumsum(1) - 1, rank)
        return TokenBatch(acts, kind[keep].to(torch.uint8).cpu(), samples, ids[keep].cpu(), rank[keep].cpu())


class ImageLoader:
    """Decodes the images of records in background threads, ahead of their use.

    ``want(indices)`` schedules records; ``get(i, skips)`` returns record ``i``'s RGB image (or
    None, counted in ``skips``), waiting for it if needed and decoding it in the calling thread if
    it was never scheduled. Skips are merged when an image is taken, so they add up in the order
    of use, whatever order the threads finish in. With ``threads=0`` nothing runs in the
    background. PIL releases the GIL while it decodes, so decoding overlaps the model's forward.
    """

    def __init__(self, records: Sequence[Any], image_root: Any, threads: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        self.records, self.root = records, Path(image_root)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="images") if threads > 0 else None
        self.pending: dict[int, Any] = {}

    def _load(self, i: int) -> tuple[Any, dict[str, Any]]:
        from lineofsight.data import SkipCounter, load_image

        skips = SkipCounter()
        return load_image(self.root / self.records[i].image, skips), skips.to_dict()

    def want(self, indices: Sequence[int]) -> None:
        if self.pool is not None:
            for i in indices:
                if i not in self.pending:
                    self.pending[i] = self.pool.submit(self._load, i)

    def get(self, i: int, skips: Any) -> Any:
        future = self.pending.pop(i, None)
        image, counts = future.result() if future is not None else self._load(i)
        skips.merge(counts)
        return image

    def batch(self, indices: Sequence[int], skips: Any) -> tuple[list[int], list[str], list[Any]]:
        """``(indices, captions, images)`` of the readable records among ``indices``."""
        idx, captions, images = [], [], []
        for i in indices:
            image = self.get(i, skips)
            if image is not None:
                idx.append(i)
                captions.append(self.records[i].caption)
                images.append(image)
        return idx, captions, images

    def close(self) -> None:
        """Drop what was scheduled and not taken; stop the threads."""
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def record_batches(records: Sequence[Any], indices: Sequence[int], image_root: Any, batch_size: int,
                   skips: Any, threads: int = 0, ahead: int = 2) -> Any:
    """Yield ``(indices, captions, images)`` batches of the records at ``indices``; a record whose
    image is missing or unreadable is counted in ``skips`` and left out (a batch may be empty).
    With ``threads`` > 0 the images of the next ``ahead`` batches are decoded in the background."""
    indices = list(indices)
    batches = [indices[lo : lo + batch_size] for lo in range(0, len(indices), batch_size)]
    loader = ImageLoader(records, image_root, threads)
    try:
        for b, batch in enumerate(batches):
            for upcoming in batches[b : b + 1 + ahead]:
                loader.want(upcoming)
            yield loader.batch(batch, skips)
    finally:
        loader.close()
