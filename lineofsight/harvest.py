"""Residual-stream tokens of captioned images, tagged by token type: what the SAEs train on.

For each ShareGPT4V-format record, two forward passes (as in the paper):

1. **image + question + caption**: ``format_prompt(question)`` followed by the caption as the model's answer
   (after ``assistant_prefix``). The image tokens (the positions holding image features:
   ``image_token_mask``) are kept (type ``image``) and so are the caption tokens (``text_in_context``); the
   template tokens around them (BOS, ``[INST]``, the question, ``[/INST]``, a family's image markers such as
   ``<|vision_start|>``, ``<start_of_image>`` or ``<row_1_col_1>``) are dropped. Their positions come from the
   image-token mask of the same batch and the fixed number of template tokens after the image, so no extra
   forward pass is needed to find them.
2. **caption alone**: BOS + caption, without image; the caption tokens are ``text_only``.

Both passes trace every requested layer at once (``layer`` = input of decoder block ``layer``)
and stop after the deepest one. Batches are right-padded, so a caption can be cut at
``max_caption_tokens`` by dropping trailing columns.

**Preprocessing off the critical path.** Pass 1's processor call (resizing and normalising the
image into LLaVA-NeXT's patches, tokenising with the image-token expansion) costs about as much
as decoding the image. ``Harvester.prepare`` (a :class:`RecordPreparer`) runs it on one record;
:class:`ImageLoader` (``prepare=``) runs it in its background threads right after decoding, and
:meth:`Harvester.collate` assembles a batch of the :class:`PreparedRecord` s it makes into exactly
the tensors of the batched processor call (``tests/test_harvest_workers.py`` checks torch.equal).
The harvester takes such records wherever it takes images.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lineofsight.cli import UserError
from lineofsight.hooks import TraceDict
from lineofsight.models import (
    assistant_prefix,
    collate_inputs,
    format_prompt,
    image_token_mask,
    processor_inputs,
    residual_site,
)
from lineofsight.prompts import CAPTION_QUESTION

__all__ = ["TOKEN_TYPES", "Harvester", "ImageLoader", "PreparedRecord", "RecordPreparer", "TokenBatch",
           "record_batches"]

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


@dataclasses.dataclass
class PreparedRecord:
    """Pass 1's model inputs for one record, made ahead of use: the processor's output for the
    single pair (prompt + caption, image), unpadded: ``input_ids [1, T]``, ``attention_mask [1, T]``,
    ``pixel_values`` (``[1, n_patches, 3, H, W]`` for LLaVA-NeXT, ``[1, 3, H, W]`` for LLaVA-1.5) already
    in the model's dtype, ``image_sizes [1, 2]`` where the processor gives it."""

    caption: str
    inputs: dict[str, torch.Tensor]


class RecordPreparer:
    """Runs the processor on one (caption, image) pair (``Harvester.prepare``); safe to call from
    several threads at once, and picklable (it holds no model).

    Each thread uses its own copy of the processor: a fast tokenizer's settings are shared Rust
    state, and the harvester's padded calls in the main thread change them (padding side, padding)
    while a worker encodes.
    """

    def __init__(self, processor: Any, prompt: str, pixel_dtype: torch.dtype) -> None:
        """``prompt``: the text before the caption (question prompt and the model's turn prefix)."""
        self.processor, self.prompt, self.pixel_dtype = processor, prompt, pixel_dtype
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __call__(self, caption: str, image: Any) -> PreparedRecord:
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        out = processor_inputs(processor, [self.prompt + caption], [image])
        inputs = dict(out.items())
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        return PreparedRecord(caption, inputs)


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
        self.prefix = assistant_prefix(processor)  # between the prompt and the caption (the model's turn)
        self.n_prompt = len(self.tok(self.prompt)["input_ids"])  # prompt with one image placeholder
        self.n_after_image = self._n_after_image()
        self.n_special = len(self.tok("")["input_ids"])  # BOS (or nothing) before a bare caption
        self.device = next(model.parameters()).device
        self.prepare = RecordPreparer(processor, self.prompt + self.prefix, next(model.parameters()).dtype)
        """``prepare(caption, image)`` -> :class:`PreparedRecord`: pass 1's processor call for one record,
        to run in a worker (``ImageLoader(..., prepare=harvester.prepare)``)."""

    # ---- positions -----------------------------------------------------------------------------

    def text(self, caption: str) -> str:
        """Pass 1's text: the prompt, then ``caption`` as the model's answer (teacher forcing)."""
        return self.prompt + self.prefix + caption

    def _n_after_image(self) -> int:
        """How many prompt tokens follow the image's last token once the processor has expanded the image (the
        template's tail: ``[/INST]``; Gemma 3's ``<end_of_image>``, Idefics3's ``<fake_token_around_image>`` too):
        pass 1's caption starts that many tokens after the image. Read off one processor call on a blank image."""
        from PIL import Image

        out = processor_inputs(self.processor, [self.prompt], [Image.new("RGB", (64, 64), (128, 128, 128))])
        positions = image_token_mask(out["input_ids"], self.model)[0].nonzero()
        if len(positions) == 0:
            raise UserError(f"{type(self.processor).__name__} writes no image tokens for the prompt {self.prompt!r}")
        return int(out["input_ids"].shape[1]) - int(positions.max()) - 1

    def check_boundary(self, caption: str) -> None:
        """The tokens of prompt + caption must start with the prompt's own tokens, or the caption
        positions would be off; raises :class:`UserError` naming the tokenizer otherwise."""
        full = self.tok(self.text(caption))["input_ids"]
        alone = self.tok(self.prompt)["input_ids"]
        if full[: len(alone)] != alone:
            raise UserError(
                f"{type(self.tok).__name__} merges the prompt's last token with the caption; "
                "cannot locate caption tokens"
            )

    def caption_token_ids(self, caption: str) -> dict[str, list[int]]:
        """The ids of ``caption``'s kept tokens as each pass reads them: ``text_in_context`` (after the prompt
        and the image) and ``text_only`` (after BOS), each cut at ``max_caption_tokens``; a token's
        ``type_index`` is its index here."""
        full = self.tok(self.text(caption))["input_ids"]
        alone = self.tok(caption)["input_ids"]
        cut = self.max_caption_tokens
        return {"text_in_context": full[self.n_prompt : self.n_prompt + cut],
                "text_only": alone[self.n_special : self.n_special + cut]}

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
                out = processor_inputs(self.processor, kwargs["text"], kwargs["images"])
            else:
                out = self.tok(kwargs["text"], return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = side
        return {k: v.to(self.device) for k, v in out.items()}

    def collate(self, records: Sequence[PreparedRecord]) -> dict[str, torch.Tensor]:
        """The batch of ``records`` as ``processor(text=..., images=..., padding=True)`` with right padding
        gives it (:func:`lineofsight.models.collate_inputs`)."""
        return collate_inputs(self.tok, [r.inputs for r in records], padding_side="right")

    def _pass1_inputs(self, captions: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Pass 1's right-padded inputs on the device, from images (the batched processor call) or from
        :class:`PreparedRecord` s of the same captions (collated)."""
        prepared = [isinstance(x, PreparedRecord) for x in images]
        if not any(prepared):
            return self._right_padded(text=[self.text(c) for c in captions], images=list(images))
        if not all(prepared) or [r.caption for r in images] != list(captions):
            raise ValueError("pass PreparedRecords for every record of a batch, made from the same captions")
        return {k: v.to(self.device) for k, v in self.collate(images).items()}

    # ---- harvesting ----------------------------------------------------------------------------

    def __call__(self, captions: Sequence[str], images: Sequence[Any], sample_ids: Sequence[int]) -> TokenBatch:
        """Tokens of one batch of (caption, image) pairs; ``sample_ids`` tag their tokens. ``images`` may
        instead hold the records' :class:`PreparedRecord` s (``self.prepare(caption, image)``)."""
        parts: list[TokenBatch] = []
        if "image" in self.types or "text_in_context" in self.types:
            parts.append(self._with_image(captions, images, sample_ids))
        if "text_only" in self.types:
            parts.append(self.caption_only(captions, sample_ids))
        return TokenBatch.cat(parts)

    def _with_image(self, captions: Sequence[str], images: Sequence[Any], sample_ids: Sequence[int]) -> TokenBatch:
        inputs, keep, kind = self.prepare_with_image(captions, images)
        return self._gather(self._run(inputs), keep, kind, inputs["input_ids"], sample_ids)

    def run_prepared(self, records: Sequence[PreparedRecord], sample_ids: Sequence[int]) -> TokenBatch:
        """Tokens of one batch of prepared records (``self.prepare``); the same as ``self(captions,
        images, sample_ids)`` on the records' captions and images."""
        return self([r.caption for r in records], records, sample_ids)

    def prepare_with_image(
        self, captions: Sequence[str], images: Sequence[Any]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Right-padded model inputs of pass 1, cut after the last kept position, with the kept
        positions ``[B, T]`` and their type codes ``[B, T]`` (-1 where not kept). The caption
        positions are kept whenever ``text_in_context`` is asked for; the codes say which is which.
        ``images`` holds images or the records' :class:`PreparedRecord` s."""
        inputs = self._pass1_inputs(captions, images)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
        img = image_token_mask(ids, self.model)
        keep = torch.zeros_like(attn)
        kind = torch.full_like(ids, -1)
        for row in range(ids.shape[0]):
            start = int(img[row].nonzero().max()) + 1 + self.n_after_image  # first caption position
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

    With ``prepare`` (``Harvester.prepare``) the threads also run it on the decoded image and
    ``get`` returns ``prepare(record.caption, image)`` (a :class:`PreparedRecord`) instead of the
    image: the processor's resizing and normalising (numpy and PIL, which also release the GIL for
    most of it) then overlap the forward too.
    """

    def __init__(self, records: Sequence[Any], image_root: Any, threads: int = 0, resize: int | None = None,
                 prepare: Callable[[str, Any], Any] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        self.records, self.root, self.resize, self.prepare = records, Path(image_root), resize, prepare
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="images") if threads > 0 else None
        self.pending: dict[int, Any] = {}

    def _load(self, i: int) -> tuple[Any, dict[str, Any]]:
        from lineofsight.data import SkipCounter, load_image

        skips = SkipCounter()
        image = load_image(self.root / self.records[i].image, skips, self.resize)
        if image is not None and self.prepare is not None:
            image = self.prepare(self.records[i].caption, image)
        return image, skips.to_dict()

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
        """``(indices, captions, images)`` of the readable records among ``indices`` (with ``prepare``,
        their prepared records in place of the images)."""
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
                   skips: Any, threads: int = 0, ahead: int = 2, resize: int | None = None,
                   prepare: Callable[[str, Any], Any] | None = None) -> Any:
    """Yield ``(indices, captions, images)`` batches of the records at ``indices``; a record whose
    image is missing or unreadable is counted in ``skips`` and left out (a batch may be empty).
    With ``threads`` > 0 the images of the next ``ahead`` batches are decoded in the background;
    ``resize`` (``--resize``) makes each image ``resize`` x ``resize`` px as it is decoded. With
    ``prepare=harvester.prepare`` the threads also run the processor and ``images`` holds the
    :class:`PreparedRecord` s, which ``harvester(captions, images, indices)`` takes as it takes images."""
    indices = list(indices)
    batches = [indices[lo : lo + batch_size] for lo in range(0, len(indices), batch_size)]
    loader = ImageLoader(records, image_root, threads, resize, prepare)
    try:
        for b, batch in enumerate(batches):
            for upcoming in batches[b : b + 1 + ahead]:
                loader.want(upcoming)
            yield loader.batch(batch, skips)
    finally:
        loader.close()
