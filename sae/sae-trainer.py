"""Train sparse autoencoders on a VLM's residual stream over captioned images, with torch DDP.

**Several SAEs from one harvest.** ``--layer 8 12 16 20 24`` with lists of ``--expansion``, ``--k`` or
``--l1-coefficient`` trains one SAE per (layer, configuration), each in ``<out>/saes/<name>/`` (``L8``, or
``L8-x16-k64`` when a flag lists several values) with its own Adam and dead-latent counts, all fed by one
forward that stops after the deepest layer. Every SAE sees the same batches, so each equals the SAE a run of
its own would train. Under torchrun every rank holds every SAE under DDP, or with ``--distribute-saes`` each
rank trains a share of them (largest first, to the least-loaded rank) on the global batch: the tokens every
rank harvests at a layer are gathered on the ranks training an SAE there (from a cache, each owner reads the
global batch of its layers itself). Before anything is allocated, the memory this rank's SAEs need (weights,
gradients and Adam, one step's activations, the shuffle buffer) is compared with what the device has free.

Online mode (default): every rank loads the VLM, reads a disjoint share of the ShareGPT4V records
(reshuffled every epoch), harvests the layers with an early stop (image tokens, caption tokens in
context, caption tokens alone: ``lineofsight/harvest.py``) into a shuffle buffer and trains the SAEs.
The shuffle buffer (``OnlineSource``) has a fixed size on the training device (``--buffer-dtype``,
default the model's) and is refilled in place: a step moves one batch of rows, whatever the buffer's
size. ``--activations <cache>`` (from ``sae/cache_activations.py``) trains from a token cache instead:
each step's global batch is a slice of one seeded permutation of the cache, split between the ranks, so
any number of ranks trains on exactly the same batches; each rank reads only its rows of each batch from
the shard files (``lineofsight.cache.TokenRows``), so memory does not grow with the cache.

Before the first step each layer's activation scale (mean norm -> sqrt(d_in)) and ``b_dec`` (the mean)
are set from rank 0's buffer (from a cache: the first rows of global batch 0) and broadcast. Schedules
follow the paper: lambda warmed up over the first ``--l1-warmup-frac`` of the steps, the learning rate
decayed linearly to 0 over the last ``--lr-decay-frac``. Every ``--checkpoint-every`` steps an atomic
checkpoint holds each SAE's weights, Adam state and dead-latent counters (a file per SAE, written by the
rank that trains it), the step, every rank's data position, shuffle buffer and RNG state; ``--resume``
continues exactly where it stopped (kill -9 included).

Divergence: every update is checked before it is kept. After the step of every SAE one all-reduce
brings each SAE's loss and a float64 sum of its weights from every rank; a non-finite loss or weight,
or a loss above ``--diverge-factor`` times its early value (the SAE's mean loss over the first 10
steps), stops the run with a one-line error naming the SAE and the last good checkpoint, before
anything more is written. A checkpoint (and the final SAEs) is written only after the new weights pass
the same test on the step's batch and the Adam state is finite, so no checkpoint ever holds a diverged
or non-finite state, and ``--resume`` continues from the one named (``--diverge-factor`` may change on
resume). Under torchrun a collective that waits longer than ``$LINEOFSIGHT_DIST_TIMEOUT_S`` (default
1800 s) for a frozen or lost rank stops the run with a one-line error naming the rank
(``lineofsight/dist.py``), and a worker whose launcher has died stops before its next step, so the last
checkpoint stays intact.

The run folder ``--out`` follows ``lineofsight/run.py``: refused when it holds a run unless
``--resume`` or ``--overwrite`` (which removes the earlier run's outputs only after the inputs are
validated), locked while the run lasts, and recorded in ``run.json`` (command, config, git SHA,
versions, status). It ends with ``saes/<name>/`` (each SAE: ``sae.safetensors`` + ``cfg.json``),
``metrics.json`` (per SAE), ``log.jsonl`` (a line per SAE and logged step) and ``checkpoints/``.

    python sae/sae-trainer.py --layer 2 --total-tokens 2000000 --out runs/sae      # toy, CPU
    python sae/sae-trainer.py --layer 1 2 3 --expansion 4 8 --out runs/sae-6      # six SAEs, one harvest
    torchrun --nproc_per_node 2 sae/sae-trainer.py --layer 2 --out runs/sae-ddp     # gloo on CPU
    torchrun --nproc_per_node 8 sae/sae-trainer.py --model llava-hf/llava-v1.6-mistral-7b-hf \\
        --dtype bfloat16 --data /data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \\
        --image-root /data/sharegpt4v --layer 8 12 16 20 24 --expansion 8 --l1-coefficient 5 --lr 5e-5 \\
        --batch-size 4096 --total-tokens 400000000 --sae-autocast --out /scratch/sae-paper
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.models import Dtype
from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle

LOG_FILE = "log.jsonl"
DIVERGE_EARLY_STEPS = 10
"""The loss's early value (what ``--diverge-factor`` multiplies) is its mean over this many first steps."""
OUTPUTS = ("saes", "metrics.json", LOG_FILE, "checkpoints")
"""What a run writes into --out (what --overwrite removes; run.json and the lock are the lifecycle's)."""


@dataclasses.dataclass
class Config:
    """Options for SAE training."""

    model: str = "toy"
    """'toy', an HF id (llava-hf/llava-v1.6-mistral-7b-hf) or a local directory (online mode)."""
    data: Path = TOY_WORLD_DIR / "sharegpt4v.json"
    """ShareGPT4V-format JSON list of records (online mode)."""
    image_root: Path | None = None
    """Folder the records' image paths are relative to (default: the JSON file's folder)."""
    limit: int | None = None
    """Online mode: use only the first N records (hold out the rest for evaluation)."""
    activations: Path | None = None
    """Train from this token cache (sae/cache_activations.py) instead of harvesting online."""
    layer: tuple[int, ...] = ()
    """Residual-stream layers: the input of decoder block L (hidden_states[L]). One SAE per layer (and per
    configuration), all fed by one harvest that stops after the deepest (``--layer 8 12 16 20 24``). Default: 8 (the
    paper's) for a model with at least 16 layers, else n_layers // 2; with --activations, the cache's first layer."""
    types: tuple[str, ...] = ("image", "text_in_context", "text_only")
    """Token types to train on."""
    activation: Literal["relu", "topk", "batchtopk"] = "relu"
    """relu (April-update objective), topk or batchtopk."""
    expansion: tuple[int, ...] = (8,)
    """d_sae = expansion x d_model (the paper: 8). Several values train one SAE per value (and per layer)."""
    k: tuple[int, ...] = (32,)
    """Active latents per token (topk, batchtopk). Several values train one SAE per value."""
    l1_coefficient: tuple[float, ...] = (5.0,)
    """Sparsity coefficient lambda (relu; the paper: 5). Several values train one SAE per value."""
    distribute_saes: bool = False
    """Under torchrun: each rank trains a share of the SAEs (the largest first, each to the least-loaded rank), and
    the tokens every rank harvests at a layer are sent to the ranks training an SAE on it, so each SAE steps once
    per step on the global batch (fits many SAEs where one rank's memory cannot hold them all). Without it every
    rank holds every SAE under DDP."""
    l1_warmup_frac: float = 0.05
    """Fraction of the steps over which lambda rises linearly from 0."""
    lr: float = 5e-5
    """Adam learning rate (the paper: 5e-5)."""
    lr_decay_frac: float = 0.2
    """The learning rate decays linearly to 0 over this last fraction of the steps."""
    batch_size: int = 4096
    """Tokens per rank per step."""
    total_tokens: int = 2_000_000
    """Tokens to train on, over all ranks (steps = total_tokens / (batch_size x world size))."""
    buffer_batches: int = 8
    """Online mode: the shuffle buffer holds this many batches of tokens (a token waits in it --buffer-batches steps
    on average; see OnlineSource)."""
    buffer_dtype: Dtype | None = None
    """Online mode: dtype of the shuffle buffer, kept on the training device (default: --dtype, the model's, which the
    harvested activations already have: a bfloat16 model's buffer takes half the memory of a float32 one and loses
    nothing; float32 on request). Batches reach the SAE as float32."""
    records_per_forward: int = 8
    """Online mode: records per harvesting forward pass."""
    resize: int | None = None
    """Online mode: resize images to N x N px before the processor (the paper: 336: 1,176 image tokens for LLaVA-NeXT),
    recorded in each SAE's cfg.json. With --activations the cache's resize is used (another value is refused)."""
    load_threads: int = 4
    """Online mode: threads that decode the images of the next forward passes while the model runs (0: none)."""
    max_caption_tokens: int = 128
    """Online mode: caption tokens kept per pass."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens (all ranks) counts as dead."""
    aux_k: int = 256
    """Dead latents in the AuxK loss (topk, batchtopk)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 20
    """Steps between log lines."""
    diverge_factor: float = 1e3
    """Stop when the loss (mean over the ranks) rises above this multiple of its early value: the mean loss of the
    first 10 steps (while those run: of the ones so far). 0: off; a non-finite loss or weight always stops the
    run. The update is not kept, nothing more is written, and the error names the last good checkpoint. May
    change on --resume."""
    dtype: Dtype = "float32"
    """VLM dtype."""
    sae_autocast: bool = False
    """GPU: run the SAE forward under bfloat16 autocast (weights and Adam stay float32)."""
    device: str | None = None
    """Device: cpu, cuda or cuda:N (default: this rank's GPU if there is one, else cpu)."""
    seed: int = 0
    """Seeds SAE init, record order and batch order."""
    out: Path = Path("runs/sae")
    """Run folder (refused when it holds a run, unless --resume or --overwrite; see lineofsight/run.py)."""
    resume: bool = False
    """Continue the trainer's run in --out from its last checkpoint (from scratch when it has none)."""
    overwrite: bool = False
    """Start the trainer's run in --out again: its outputs are removed once the inputs are validated."""
    wandb: str | None = None
    """Log to this Weights & Biases project (needs wandb installed)."""
    step_delay: float = 0.0
    """Testing: sleep this many seconds at the end of every step, after its checkpoint (so a test can kill
    a run mid-way)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        for name in ("batch_size", "total_tokens", "buffer_batches", "records_per_forward"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        for name in ("layer", "expansion", "k", "l1_coefficient"):
            values, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if name != "layer" and not values:
                raise UserError(f"{flag} needs at least one value")
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise UserError(f"{flag} lists {twice[0]:g} more than once")
        if any(v < 0 for v in self.layer):
            raise UserError(f"--layer {min(self.layer)} is out of range: layers are 0..n_layers")
        for name in ("expansion", "k"):
            if any(v < 1 for v in getattr(self, name)):
                raise UserError(f"--{name} must be positive")
        if self.activation == "relu" and len(self.k) > 1:
            raise UserError("--k lists several values, but --activation relu has no k (it takes --l1-coefficient)")
        if self.activation != "relu" and len(self.l1_coefficient) > 1:
            raise UserError(f"--l1-coefficient lists several values, but --activation {self.activation} has no "
                            "lambda (it takes --k)")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be positive")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise UserError("--log-every must be positive and --checkpoint-every >= 0")
        # Non-finite numbers first, in the words of lineofsight.cli.check_finite (NaN fails every comparison).
        for name in ("lr", "l1_coefficient", "l1_warmup_frac", "lr_decay_frac", "diverge_factor", "step_delay"):
            given = getattr(self, name)
            for value in given if isinstance(given, tuple) else (given,):
                if not math.isfinite(value):
                    raise UserError(f"--{name.replace('_', '-')} {value}: not a finite number")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if any(v < 0 for v in self.l1_coefficient):
            raise UserError("--l1-coefficient must be >= 0")
        for name in ("l1_warmup_frac", "lr_decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a fraction in [0, 1]")
        if not (self.diverge_factor == 0 or self.diverge_factor > 1):
            raise UserError(f"--diverge-factor {self.diverge_factor}: must be 0 (off) or > 1")
        if self.step_delay < 0:
            raise UserError("--step-delay must be >= 0")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        from lineofsight.data import check_resize

        check_resize(self.resize)


# Fields that must agree between a run and its --resume (the rest may change, e.g. --log-every). The
# layers are compared with the checkpoint's SAEs instead: a default (none given) resolves to a number.
RESUME_KEYS = ("model", "data", "limit", "activations", "types", "activation", "expansion", "k", "l1_coefficient",
               "distribute_saes", "resize", "l1_warmup_frac", "lr", "lr_decay_frac", "batch_size", "total_tokens",
               "buffer_batches", "buffer_dtype", "records_per_forward", "max_caption_tokens", "dead_after_tokens",
               "aux_k", "seed")


def lr_factor(step: int, n_steps: int, decay_frac: float) -> float:
    """1 until the last ``decay_frac`` of the steps, then linearly down to 0 at the end."""
    decay_start = n_steps * (1 - decay_frac)
    if step < decay_start:
        return 1.0
    return max(0.0, (n_steps - step) / max(1.0, n_steps - decay_start))


def l1_factor(step: int, n_steps: int, warmup_frac: float) -> float:
    """Linear warm-up of lambda from 0 over the first ``warmup_frac`` of the steps."""
    warmup = n_steps * warmup_frac
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------------------------------------
# Token sources
# ---------------------------------------------------------------------------------------------


class OnlineSource:
    """Harvests this rank's records (every epoch a new seeded order) into a fixed-capacity shuffle buffer.

    **The buffer** is ``acts [C, n_layers, d_model]`` (every ``--layer``, harvested by one forward) in
    ``--buffer-dtype`` and ``types [C]`` on the training device, C = ``--buffer-batches`` x ``--batch-size``,
    allocated once and then only written in place. It is filled by the first harvests; then each step draws B = ``--batch-size`` distinct
    slots uniformly at random (the first B of a seeded permutation of the C slots), copies their
    tokens out as the batch (float32), and overwrites exactly those B slots with the next harvested
    tokens, in harvest order. A harvest (``--records-per-forward`` records) that brings more tokens
    than the free slots need leaves the rest in the *staging area* (the unused tail of that one
    harvest); a new harvest runs only when the staging area is empty, so it never holds more than one
    harvest. A step therefore reads B rows and writes B rows, whatever C is. The checkpointed state
    is exactly the buffer, the staging area, the RNG and the position in the records.

    **Mixing guarantee.** (1) Every harvested token enters the buffer exactly once, in harvest order
    (none is dropped or duplicated), and is served at most once: its slot is overwritten right after
    it is served. (2) Each batch is a uniformly random B-subset of the C resident tokens, drawn
    independently of how long they have waited; so at every step each resident token is served with
    probability B / C = 1 / K (K = ``--buffer-batches``). A token that enters the buffer in the refill
    after step t is served at step t + w, w >= 1 geometric with mean K: P(w > k) = (1 - 1/K)^k (K = 8:
    55 % are served within 6 steps, 99 % within 35). Tokens of the initial fill are served from step
    0 on with the same law. A batch's tokens come from about the last K refills, not from one image.
    """

    def __init__(self, cfg: Config, harvester: Any, records: list[Any], rank: int, world: int, device: Any) -> None:
        import torch

        from lineofsight.data import SkipCounter
        from lineofsight.harvest import ImageLoader

        self.cfg, self.harvester, self.records = cfg, harvester, records
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.epoch, self.cursor = 0, 0
        self.skips = SkipCounter()
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
        self.dtype = getattr(torch, cfg.buffer_dtype or cfg.dtype)
        self.capacity = cfg.buffer_batches * cfg.batch_size
        self.layers: list[int] = list(harvester.layers) if harvester is not None else []
        """The layers of a row (the second axis of ``acts``)."""
        self.acts: Any = None
        """``[C, n_layers, d_model]`` in ``--buffer-dtype`` on the device; allocated at the first harvest."""
        self.types = torch.zeros(self.capacity, dtype=torch.uint8, device=self.device)
        self.n_filled = 0
        """Slots filled so far (C once the first fill is done)."""
        self.stage_acts: Any = None
        """``[S, n_layers, d_model]``: the tokens of the last harvest not yet in the buffer (S <= one harvest)."""
        self.stage_types = torch.zeros(0, dtype=torch.uint8, device=self.device)
        self.image_root = cfg.image_root or cfg.data.parent
        self._order: list[int] | None = None
        self.loader = ImageLoader(records, self.image_root, cfg.load_threads, cfg.resize,
                                  prepare=getattr(harvester, "prepare", None))

    def _my_records(self) -> list[int]:
        import torch

        from lineofsight.cli import UserError

        if self._order is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.epoch)
            order = torch.randperm(len(self.records), generator=g).tolist()
            self._order = order[self.rank :: self.world]
            if not self._order:
                raise UserError(f"rank {self.rank} has no records ({len(self.records)} for {self.world} ranks)")
        return self._order

    def _harvest_more(self) -> tuple[list[int], dict[int, dict[str, Any]]]:
        """Harvest this rank's next ``--records-per-forward`` records into the (empty) staging area;
        returns them and the skip counts of those whose image could not be read."""
        import torch

        from lineofsight.data import SkipCounter

        mine = self._my_records()
        n = self.cfg.records_per_forward
        chunk = mine[self.cursor : self.cursor + n]
        self.loader.want(chunk)
        self.loader.want(mine[self.cursor + n : self.cursor + 3 * n])  # decoded while this chunk runs
        self.cursor += len(chunk)
        if self.cursor >= len(mine):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        idx, captions, images, unread = [], [], [], {}
        for i in chunk:  # ImageLoader.batch, keeping each record's skip reason
            skipped = SkipCounter()
            image = self.loader.get(i, skipped)
            self.skips.merge(skipped.to_dict())
            if image is None:
                unread[i] = skipped.to_dict()
            else:
                idx.append(i)
                captions.append(self.records[i].caption)
                images.append(image)
        if idx:
            got = self.harvester(captions, images, idx)
            self.stage_acts = got.acts.to(self.device, self.dtype)
            self.stage_types = got.token_type.to(self.device, torch.uint8)
            if self.acts is None:
                self.acts = torch.zeros(self.capacity, *self.stage_acts.shape[1:], dtype=self.dtype, device=self.device)
        return chunk, unread

    def close(self) -> None:
        self.loader.close()

    def _write(self, slots: Any) -> None:
        """Write the next tokens (staged first, then new harvests) into buffer ``slots`` (a LongTensor on the
        device), in order. :class:`UserError` when every one of this rank's records has been tried since
        the last token came (a full pass gave no tokens)."""
        n_mine = len(range(self.rank, len(self.records), self.world))
        dry: dict[int, dict[str, Any] | None] = {}  # records tried without a token: skip counts (None: read)
        done = 0
        while done < len(slots):
            if len(self.stage_types) == 0:
                chunk, unread = self._harvest_more()
                if len(self.stage_types):
                    dry = {}
                    continue
                dry.update({i: unread.get(i) for i in chunk})  # by record: each image counted once
                if len(dry) >= n_mine:
                    self.close()
                    raise self._no_tokens(dry)
                continue
            k = min(len(self.stage_types), len(slots) - done)
            dst = slots[done : done + k]
            self.acts.index_copy_(0, dst, self.stage_acts[:k])
            self.types.index_copy_(0, dst, self.stage_types[:k])
            self.stage_acts, self.stage_types = self.stage_acts[k:], self.stage_types[k:]  # views: no copy
            done += k

    def fill(self) -> None:
        """The first fill: harvest until every slot of the buffer holds a token."""
        import torch

        if self.n_filled < self.capacity:
            self._write(torch.arange(self.n_filled, self.capacity, device=self.device))
            self.n_filled = self.capacity

    def _no_tokens(self, dry: dict[int, dict[str, Any] | None]) -> Exception:
        from lineofsight.cli import UserError
        from lineofsight.data import SkipCounter

        skips = SkipCounter()
        for counts in dry.values():
            if counts is not None:
                skips.merge(counts)
        who = f"rank {self.rank}'s {len(dry)}" if self.world > 1 else f"the {len(dry)}"
        why = "; ".join(f"{n} {reason}, e.g. {skips.examples[reason][0]}"
                        for reason, n in sorted(skips.counts.items()))
        where = f"check --data {self.cfg.data} and --image-root {self.image_root}"
        if skips.total == len(dry):
            return UserError(f"every one of {who} records' images was unreadable ({why}); {where}")
        types = ", ".join(self.cfg.types)
        return UserError(f"a full pass over {who} records gave no tokens of --types {types} "
                         f"({skips.total} unreadable images{': ' + why if why else ''}); {where}")

    def next_batch(self, step: int) -> tuple[Any, Any]:
        """``(acts [B, n_layers, d_model] in --buffer-dtype, types [B])`` on the device; see the class docstring."""
        import torch

        self.fill()
        slots = torch.randperm(self.capacity, generator=self.gen)[: self.cfg.batch_size].to(self.device)
        x, t = self.acts[slots], self.types[slots]  # copies, taken before the slots are refilled
        self._write(slots)
        return x, t

    def peek(self, n: int, column: int) -> Any:
        """``[n, d_model]`` float32: the first ``n`` buffered tokens at ``self.layers[column]`` (the first fill)."""
        self.fill()
        return self.acts[:n, column].float()

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, JSON) of this rank's buffer, staging area, RNG and data position."""
        tensors = {"buffer_acts": self.acts, "buffer_types": self.types, "stage_acts": self.stage_acts.clone(),
                   "stage_types": self.stage_types.clone(), "gen_state": self.gen.get_state()}
        meta = {"epoch": self.epoch, "cursor": self.cursor, "n_filled": self.n_filled,
                "skipped": self.skips.to_dict()}
        return tensors, meta

    def load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        from lineofsight.cli import UserError

        if ("stage_acts" not in tensors or len(tensors["buffer_types"]) != self.capacity
                or tensors["buffer_acts"].dim() != 3):
            raise UserError("--resume: the checkpoint holds a shuffle buffer of an older trainer; "
                            "start the run again with --overwrite")
        self.acts = tensors["buffer_acts"].to(self.device)
        if self.acts.dtype != self.dtype:
            raise UserError(f"--resume: the checkpoint's buffer is {self.acts.dtype}, not --buffer-dtype {self.dtype}")
        self.types = tensors["buffer_types"].to(self.device)
        self.stage_acts, self.stage_types = tensors["stage_acts"].to(self.device), tensors["stage_types"].to(self.device)
        self.gen.set_state(tensors["gen_state"])
        self.epoch, self.cursor, self._order = meta["epoch"], meta["cursor"], None
        self.n_filled = meta["n_filled"]
        self.skips.merge(meta["skipped"])


class CacheSource:
    """Tokens from a cache; global batch ``step`` is a fixed slice of one seeded permutation per epoch. ``acts`` is a
    :class:`lineofsight.cache.TokenRows` of ``layers`` (each step reads just the rows it needs from the shard files)
    or an in-memory ``[N, n_layers, d_model]`` tensor. Rank r takes the r-th part of each global batch, or with
    ``whole`` (``--distribute-saes``: the SAEs on this rank step on the global batch) all of it, at only the
    layers its SAEs read: no tokens travel between ranks."""

    def __init__(self, cfg: Config, acts: Any, types: Any, layers: list[int], rank: int, world: int, device: Any,
                 whole: bool = False) -> None:
        from lineofsight.data import SkipCounter

        self.cfg, self.acts, self.types, self.layers = cfg, acts, types, layers
        self.rank, self.world, self.device, self.whole = rank, world, device, whole
        self.global_batch = cfg.batch_size * world
        self.skips = SkipCounter()
        self._perm_epoch, self._perm = -1, None

    def _global_indices(self, step: int) -> Any:
        import torch

        n = len(self.types)
        start = step * self.global_batch
        out = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(start + len(out), n)
            if epoch != self._perm_epoch:  # int32 (the same order as int64's): 4 bytes a token, 2 GB at 0.5 B
                g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
                dtype = torch.int32 if n < 2**31 else torch.int64
                self._perm, self._perm_epoch = torch.randperm(n, generator=g, dtype=dtype), epoch
            out += self._perm[offset : offset + self.global_batch - len(out)].tolist()
        return torch.tensor(out, dtype=torch.long)

    def next_batch(self, step: int) -> tuple[Any, Any]:
        """``(acts [n, len(layers), d_model] in the cache's dtype, types [n])`` on the device: n = B, or the
        global batch with ``whole``."""
        idx = self._global_indices(step)
        if not self.whole:
            idx = idx[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        return self.acts[idx].to(self.device), self.types[idx].to(self.device)

    def peek(self, n: int, column: int) -> Any:
        """``[<= n, d_model]`` float32: the first tokens of global batch 0 at ``layers[column]``."""
        import torch

        return self.acts[self._global_indices(0)[:n]][:, column].to(torch.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The SAEs of a run: which (layer, configuration), on which rank, how much memory
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One SAE of the run."""

    name: str
    """Its folder under ``<out>/saes/``: ``L<layer>``, plus ``-x<expansion>``, ``-k<k>``, ``-l1_<lambda>`` for each
    of those flags given several values."""
    layer: int
    expansion: int
    k: int
    l1_coefficient: float
    d_sae: int
    owner: int | None
    """The rank that trains it (``--distribute-saes``), else None: every rank, under DDP."""

    def here(self, rank: int) -> bool:
        return self.owner is None or self.owner == rank

    def reporter(self) -> int:
        """The rank that writes its files and log lines."""
        return 0 if self.owner is None else self.owner


def plan_saes(cfg: Config, layers: list[int], d_in: int, world: int) -> list[Spec]:
    """One :class:`Spec` per (layer, expansion, k, lambda), by layer, then in the order the values were given;
    with ``--distribute-saes`` each is given to a rank, the largest first, each to the least-loaded rank."""
    import itertools

    from lineofsight.cli import UserError

    specs = []
    for layer, e, k, l1 in itertools.product(layers, cfg.expansion, cfg.k, cfg.l1_coefficient):
        name = (f"L{layer}" + (f"-x{e}" if len(cfg.expansion) > 1 else "") + (f"-k{k}" if len(cfg.k) > 1 else "")
                + (f"-l1_{l1:g}" if len(cfg.l1_coefficient) > 1 else ""))
        if cfg.activation != "relu" and k > e * d_in:
            raise UserError(f"--k {k} is more than the {e * d_in} latents of SAE {name} (--expansion {e} x the "
                            f"width {d_in} of layer {layer})")
        specs.append(Spec(name, layer, e, k, l1, e * d_in, None))
    if not cfg.distribute_saes:
        return specs
    if world > len(specs):
        raise UserError(f"--distribute-saes: {world} ranks for {len(specs)} SAE{'s' * (len(specs) > 1)}; each rank "
                        f"trains at least one (use at most {len(specs)} ranks, or leave out --distribute-saes)")
    load = [0] * world
    owners = {}
    for i in sorted(range(len(specs)), key=lambda i: (-specs[i].d_sae, i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i], load[rank] = rank, load[rank] + specs[i].d_sae
    return [dataclasses.replace(spec, owner=owners[i]) for i, spec in enumerate(specs)]


def memory_needed(cfg: Config, specs: list[Spec], d_in: int, n_layers: int, rank: int, world: int,
                  online: bool) -> dict[str, int]:
    """Bytes this rank needs beyond the model, by part: the SAEs' float32 weights, gradients and two Adam moments
    (16 bytes a parameter; 20 under DDP, whose gradient buckets are a second copy), one per-rank batch of one
    SAE at a time (pre-activations, latents and their gradients, and the batch itself), with --distribute-saes
    the global batch of each layer trained here, and the online shuffle buffer with one batch taken out of it."""
    import torch

    mine = [s for s in specs if s.here(rank)]
    ddp = world > 1 and not cfg.distribute_saes  # DDP keeps a bucket copy of the gradients
    state = sum((20 if ddp else 16) * (2 * d_in * s.d_sae + s.d_sae + d_in) for s in mine)
    step = max((4 * 4 * cfg.batch_size * (s.d_sae + d_in) for s in mine), default=0)  # one per-rank batch
    need = {"SAE weights, gradients and Adam": state, "one batch's activations": step}
    if cfg.distribute_saes:
        need["gathered global batches"] = 4 * world * cfg.batch_size * d_in * len({s.layer for s in mine})
    if online:
        size = torch.empty(0, dtype=getattr(torch, cfg.buffer_dtype or cfg.dtype)).element_size()
        need["shuffle buffer"] = (cfg.buffer_batches + 1) * cfg.batch_size * n_layers * d_in * size
    return need


def memory_free(device: Any) -> int | None:
    """Bytes the run can still allocate on ``device``: free GPU memory, or the host's available memory."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: Config, specs: list[Spec], data: Data, run: Run) -> None:
    """A one-line error, before anything is allocated, when this rank's SAEs cannot fit the memory it can see."""
    from lineofsight.cli import UserError

    info = run.info
    need = memory_needed(cfg, specs, data.d_in, len(data.layers), info.rank, info.world_size,
                         cfg.activations is None)
    free = memory_free(info.device)
    total = sum(need.values())
    if free is None or total <= free:
        return
    n = sum(s.here(info.rank) for s in specs)
    parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items())
    hint = ("leave out some --layer or configuration values, lower --batch-size or --buffer-batches, or use "
            "--distribute-saes under torchrun (each rank takes a share)" if not cfg.distribute_saes else
            "use more ranks, fewer SAEs, or a lower --batch-size")
    raise UserError(f"the {n} SAE{'s' * (n > 1)} rank {info.rank} trains need about {total / 2**30:.1f} GiB ({parts}) "
                    f"but {info.device} has {free / 2**30:.1f} GiB free; {hint}")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def sae_file(folder: Path, name: str) -> Path:
    """The file of SAE ``name`` in checkpoint ``folder``: its weights, Adam state and dead-latent counts."""
    return folder / f"sae-{name}.safetensors"


def save_checkpoint(out: Path, tr: Training, source: Any, rank: int, world: int) -> None:
    """``out/checkpoints/step-<N>/``: one file per rank (its data position, buffer and RNG), one per SAE (written
    by the rank that trains it: weights, Adam state, dead-latent counts), then ``state.json`` (rank 0, last),
    then ``out/checkpoints/latest`` pointing at it; older checkpoints are removed after that. Each file is
    streamed to a temporary name and renamed (``lineofsight.io.save_tensors``): no second copy in memory."""
    import shutil

    import torch

    from lineofsight import dist
    from lineofsight.io import atomic_write_text, save_tensors, write_json

    folder = out / "checkpoints" / f"step-{tr.step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    data_tensors, data_meta = source.state()
    tensors = {f"data.{k}": v for k, v in data_tensors.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(folder / f"rank{rank:03d}.safetensors", tensors, {"data": json.dumps(data_meta)})
    described = {}
    for unit in tr.units:
        if unit.spec.reporter() != rank:
            continue
        state = {f"sae.{k}": v for k, v in unit.sae.state_dict().items()}
        state["since_fired"] = unit.since_fired
        opt_state = unit.opt.state_dict()
        for i, s in opt_state["state"].items():
            for name, value in s.items():
                state[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_tensors(sae_file(folder, unit.spec.name), state)
        described[unit.spec.name] = {
            "layer": unit.spec.layer, "sae_cfg": unit.sae.cfg.to_json(), "opt_param_groups": opt_state["param_groups"],
            "opt_keys": {str(i): list(s) for i, s in opt_state["state"].items()},
            "early_loss_sum": unit.early_loss_sum, "early_loss_n": unit.early_loss_n,
        }
    everyone = dist.all_gather_object(described)  # also the barrier: every file above is in place
    if rank == 0:
        saes = {name: d for part in everyone for name, d in part.items()}
        write_json(folder / "state.json", {"step": tr.step, "world_size": world, "tokens_seen": tr.tokens_seen,
                                           "saes": {s.name: saes[s.name] for s in tr.specs}})
        atomic_write_text(out / "checkpoints" / "latest", folder.name + "\n")
        for old in (out / "checkpoints").glob("step-*"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``out/checkpoints/latest`` points at, when it is complete; else None."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = out / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, checked; a damaged one (truncated by a full disk, edited by hand) or one
    written by the one-SAE trainer of earlier versions is a one-line error naming the file."""
    from lineofsight.cli import UserError
    from lineofsight.io import read_json

    path = folder / "state.json"
    state = read_json(path, "checkpoint state", required={"step": "int", "world_size": "int"})
    if not isinstance(state.get("saes"), dict):
        raise UserError(f"--resume: checkpoint state {path} was written by an older trainer (one SAE per run, "
                        "no 'saes'); start the run again with --overwrite")
    for name, d in state["saes"].items():
        if not isinstance(d, dict) or not {"layer", "sae_cfg", "opt_param_groups", "opt_keys"} <= set(d):
            raise UserError(f"checkpoint state {path}: the entry of SAE {name!r} lacks layer, sae_cfg, "
                            "opt_param_groups or opt_keys")
    return state


def load_checkpoint(folder: Path, tr: Training, source: Any, rank: int) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote that this rank holds; returns ``state.json``."""
    import torch

    from lineofsight.cli import UserError
    from lineofsight.io import load_tensors, open_tensors, tensors_metadata
    from lineofsight.sae import SAEConfig

    state = read_state(folder)
    for unit in tr.units:
        d = state["saes"][unit.spec.name]
        trainer = load_tensors(sae_file(folder, unit.spec.name), "checkpoint", ["since_fired"])
        try:
            unit.sae.cfg.act_scale = SAEConfig.from_json(d["sae_cfg"]).act_scale
        except (ValueError, TypeError) as err:
            raise UserError(f"checkpoint state {folder / 'state.json'}: SAE {unit.spec.name}: {err}") from None
        unit.sae.cfg.threshold = d["sae_cfg"].get("threshold")
        unit.sae.load_state_dict({k[4:]: v for k, v in trainer.items() if k.startswith("sae.")})
        opt_state = {"state": {}, "param_groups": d["opt_param_groups"]}
        for i, keys in d["opt_keys"].items():
            opt_state["state"][int(i)] = {name: trainer[f"opt.{i}.{name}"] for name in keys}
        unit.opt.load_state_dict(opt_state)
        unit.since_fired = trainer["since_fired"].to(unit.since_fired.device)
        # checkpoints from before the divergence check have no reference: it is measured again from here
        unit.early_loss_sum, unit.early_loss_n = d.get("early_loss_sum", 0.0), d.get("early_loss_n", 0)
    rank_file = folder / f"rank{rank:03d}.safetensors"
    with open_tensors(rank_file, "checkpoint") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        data_meta = tensors_metadata(f, rank_file, "checkpoint", "data")
    source.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("data.")}, data_meta)
    torch.set_rng_state(tensors["rng.torch"])
    return state


# ---------------------------------------------------------------------------------------------
# Training step and metrics
# ---------------------------------------------------------------------------------------------


def _step_module(sae: Any) -> Any:
    """A module whose forward is the SAE's training loss, so DDP syncs its gradients."""
    from torch import nn

    class TrainStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sae = sae

        def forward(self, x: Any, l1_coefficient: float, dead_mask: Any) -> dict[str, Any]:
            return self.sae.loss(x, l1_coefficient=l1_coefficient, dead_mask=dead_mask)

    return TrainStep()


def batch_metrics(x: Any, x_hat: Any, latents: Any, types: Any, scale: float) -> dict[str, float]:
    """L0 and FVU on this batch, overall and per token type (raw space)."""
    from lineofsight.harvest import TOKEN_TYPES
    from lineofsight.sae import fvu

    x_hat = x_hat / scale
    active = (latents > 0).sum(-1).float()
    out = {"l0": float(active.mean()), "fvu": float(fvu(x.float(), x_hat.float()))}
    for code, name in enumerate(TOKEN_TYPES):
        sel = types == code
        if int(sel.sum()) > 1:
            out[f"l0/{name}"] = float(active[sel].mean())
            out[f"fvu/{name}"] = float(fvu(x[sel].float(), x_hat[sel].float()))
    return out


# ---------------------------------------------------------------------------------------------
# The run, stage by stage: data, SAEs (new or resumed), training loop, finish
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """What the data stage hands on: this rank's token source and what the SAEs read."""

    source: Any
    """:class:`OnlineSource` or :class:`CacheSource`."""
    layers: list[int]
    """The run's layers (inputs of decoder blocks ``layer``), ascending."""
    d_in: int
    """Width of the residual stream."""
    model: str
    """The model the tokens come from (resolved path or HF id)."""
    hook_names: dict[int, str] = dataclasses.field(default_factory=dict)
    """Per layer, the module whose input is read (online mode; none for a cache)."""
    resize: int | None = None
    """The square side the images were resized to (None: full size)."""


@dataclasses.dataclass
class Unit:
    """One SAE trained on this rank, with what a checkpoint saves for it."""

    spec: Spec
    sae: Any
    opt: Any
    since_fired: Any
    """``[d_sae]`` tokens (all ranks) since each latent last fired."""
    step_fn: Any = None
    """Its training loss as a module (DDP-wrapped under torchrun without --distribute-saes)."""
    early_loss_sum: float = 0.0
    """Sum of the losses of the first :data:`DIVERGE_EARLY_STEPS` steps (so far): ``--diverge-factor``'s reference."""
    early_loss_n: int = 0


@dataclasses.dataclass
class Training:
    """The SAEs of the run and the length of the schedule."""

    specs: list[Spec]
    """Every SAE of the run."""
    units: list[Unit]
    """Those this rank trains (all of them, unless --distribute-saes)."""
    n_steps: int
    global_batch: int
    """Tokens per step over all ranks."""
    step: int = 0
    tokens_seen: int = 0
    last: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per SAE, its latest log line (rank 0)."""


def load_data(cfg: Config, run: Run) -> Data:
    """The token source of this rank: a token cache read row by row, or the VLM harvesting its records at every
    layer with one forward that stops after the deepest."""
    from lineofsight.cli import UserError
    from lineofsight.toy import ensure_toy_world

    info = run.info
    if cfg.activations is not None:
        from lineofsight.cache import open_token_cache
        from lineofsight.data import check_resize_match

        layers = sorted(cfg.layer) if cfg.layer else [open_token_cache(cfg.activations, None, cfg.types).layer]
        rows = open_token_cache(cfg.activations, layers, cfg.types)  # read lazily, step by step
        resize = rows.meta["key"].get("resize")  # caches from before --resize: full-size images
        if cfg.resize is not None:
            check_resize_match(cfg.resize, resize, f"the token cache {rows.cache}", False)
        return Data(CacheSource(cfg, rows, rows.types, layers, info.rank, info.world_size, info.device),
                    layers, rows.d_model, rows.meta["key"]["model"], resize=resize)

    from lineofsight.data import read_sharegpt4v
    from lineofsight.harvest import Harvester
    from lineofsight.models import check_layer, check_model, n_layers, residual_site, text_config

    ensure_toy_world(cfg.data)
    records = read_sharegpt4v(cfg.data, limit=cfg.limit)
    if len(records) < info.world_size:
        raise UserError(f"--data {cfg.data} has {len(records)} usable records for {info.world_size} ranks")
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    n = n_layers(model)
    layers = sorted(cfg.layer) if cfg.layer else [8 if n >= 16 else n // 2]
    for layer in layers:
        check_layer(model, layer)
    import torch

    harvester = Harvester(model, processor, layers, max_caption_tokens=cfg.max_caption_tokens, types=cfg.types,
                          save_dtype=getattr(torch, cfg.buffer_dtype or cfg.dtype))
    harvester.check_boundary(records[0].caption)
    source = OnlineSource(cfg, harvester, records, info.rank, info.world_size, info.device)
    return Data(source, layers, text_config(model).hidden_size, model_source,
                {layer: residual_site(model, layer) for layer in layers}, cfg.resize)


def mine_only(cfg: Config, data: Data, specs: list[Spec], run: Run) -> None:
    """With --distribute-saes and a cache, read only the layers this rank's SAEs need, and the whole global batch
    of them (the SAEs here step on it): no tokens travel between ranks."""
    from lineofsight.cache import open_token_cache

    if not (cfg.distribute_saes and isinstance(data.source, CacheSource)):
        return
    mine = sorted({s.layer for s in specs if s.here(run.info.rank)})
    rows = open_token_cache(cfg.activations, mine, cfg.types)
    data.source = CacheSource(cfg, rows, rows.types, mine, run.info.rank, run.info.world_size, run.info.device,
                              whole=True)


def check_resume(cfg: Config, run: Run, specs: list[Spec]) -> None:
    """``--resume`` of a run with a checkpoint: the same :data:`RESUME_KEYS`, SAEs and world size.

    Called before :meth:`Run.open`, which replaces ``run.json`` (where the earlier config is) with
    this session's record. Anything else (no run, another script's, no checkpoint) is left to
    :meth:`Run.open` and to starting from scratch.
    """
    from lineofsight.cli import UserError
    from lineofsight.run import jsonable, read_run_record

    out = Path(cfg.out).expanduser()
    record = read_run_record(out) if out.is_dir() else None
    ckpt = latest_checkpoint(out)
    if record is None or record["script"] != run.script or ckpt is None:
        return
    old, new = record.get("config") or {}, jsonable(cfg)
    changed = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    state = read_state(ckpt)
    if {n: d["layer"] for n, d in state["saes"].items()} != {s.name: s.layer for s in specs}:
        changed.append(f"layers (it trains {', '.join(state['saes'])})")
    if changed:
        raise UserError(f"--resume: the run in {out} was started with different {', '.join(changed)}")
    if state["world_size"] != run.info.world_size:
        raise UserError(f"--resume: the checkpoint was written by {state['world_size']} ranks, "
                        f"not {run.info.world_size}")


def init_training(cfg: Config, run: Run, data: Data, specs: list[Spec]) -> Training:
    """This rank's SAEs, each with its own Adam: restored from the latest checkpoint when resuming, else new with
    the data-dependent init (each layer's activation scale and ``b_dec`` from the first tokens of rank 0, or of
    global batch 0 in a cache, broadcast)."""
    import torch

    from lineofsight import dist
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    info = run.info
    global_batch = cfg.batch_size * info.world_size
    units = []
    for spec in specs:
        if not spec.here(info.rank):
            continue
        sae_cfg = SAEConfig(d_in=data.d_in, d_sae=spec.d_sae, activation=cfg.activation, k=spec.k,
                            l1_coefficient=spec.l1_coefficient, aux_k=cfg.aux_k,
                            dead_after_tokens=cfg.dead_after_tokens, model=data.model, layer=spec.layer,
                            hook_name=data.hook_names.get(spec.layer, ""), token_types=cfg.types,
                            resize=data.resize)
        sae = SparseAutoencoder(sae_cfg, seed=cfg.seed).to(info.device)
        units.append(Unit(spec, sae, torch.optim.Adam(sae.parameters(), lr=cfg.lr),
                          torch.zeros(spec.d_sae, dtype=torch.long, device=info.device)))
    tr = Training(specs, units, n_steps=max(1, cfg.total_tokens // global_batch), global_batch=global_batch)
    ckpt = latest_checkpoint(run.out) if run.resumed else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, tr, data.source, info.rank)
        tr.step, tr.tokens_seen = state["step"], state["tokens_seen"]
        dist.print0(f"resumed from {ckpt} at step {tr.step}/{tr.n_steps}")
    else:
        if cfg.resume:
            dist.print0(f"--resume: no checkpoint in {run.out}; starting from scratch")
        n = cfg.batch_size * cfg.buffer_batches
        source = data.source
        if isinstance(source, CacheSource):  # every rank reads the same first rows of its layers
            stats = {layer: _layer_stats(source.peek(n, c).to(info.device)) for c, layer in enumerate(source.layers)}
        else:  # rank 0's buffer, broadcast
            scales = torch.zeros(len(data.layers), dtype=torch.float64, device=info.device)
            means = torch.zeros(len(data.layers), data.d_in, dtype=torch.float32, device=info.device)
            if info.is_main:
                for c in range(len(data.layers)):
                    scale, mean = _layer_stats(source.peek(n, c).to(info.device))
                    scales[c], means[c] = scale, mean
            dist.broadcast(scales)
            dist.broadcast(means)
            stats = {layer: (float(scales[c]), means[c]) for c, layer in enumerate(data.layers)}
        for unit in tr.units:
            unit.sae.cfg.act_scale, mean = stats[unit.spec.layer]
            with torch.no_grad():
                unit.sae.b_dec.copy_(mean.to(unit.sae.b_dec.dtype))
    if run.resumed and run.is_main:
        tr.last = trim_log(run.out / LOG_FILE, tr.step)
    return tr


def _layer_stats(x: Any) -> tuple[float, Any]:
    """(activation scale, scaled mean) of ``x [N, d_in]``: the data-dependent init of an SAE on its layer."""
    from lineofsight.sae import act_scale_of, scaled_mean

    scale = act_scale_of(x)
    return scale, scaled_mean(x, scale)


def trim_log(path: Path, step: int) -> dict[str, dict[str, Any]]:
    """Drop the log lines of steps after ``step`` (written after the checkpoint a resume starts
    from; they will be written again); returns the last line kept of each SAE."""
    from lineofsight.io import atomic_write_text

    if not path.is_file():
        return {}
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return {line["sae"]: line for line in map(json.loads, kept) if "sae" in line}


def route(cfg: Config, data: Data, tr: Training, step: int, rank: int) -> tuple[dict[int, Any], Any]:
    """This step's tokens for the SAEs on this rank: ``({layer: x [n, d_in] float32}, types [n])``.

    Under DDP (and in a single process) n is this rank's ``--batch-size``. With ``--distribute-saes`` n is the
    global batch: a cache source reads it directly; online, every rank's batch at a layer is gathered (in rank
    order) on each rank training an SAE on that layer, one layer and one receiving rank at a time, in the same
    order everywhere, and the token types are gathered on every rank."""
    import torch

    from lineofsight import dist

    acts, types = data.source.next_batch(step)
    layers = data.source.layers
    if not cfg.distribute_saes or isinstance(data.source, CacheSource):
        needed = {u.spec.layer for u in tr.units}
        return {layer: acts[:, c].to(torch.float32) for c, layer in enumerate(layers) if layer in needed}, types
    types = dist.all_gather(types)
    out = {}
    for c, layer in enumerate(layers):
        for owner in sorted({s.owner for s in tr.specs if s.layer == layer}):
            got = dist.gather(acts[:, c], owner)
            if got is not None:
                out[layer] = got.to(torch.float32)
    return out, types


def train(cfg: Config, run: Run, data: Data, tr: Training) -> None:
    """Steps ``tr.step`` .. ``tr.n_steps``: for each SAE on this rank in turn its step (DDP under torchrun unless
    --distribute-saes), schedules, dead-latent counts; one health check for all; log lines, checkpoints. Every
    step first checks that this worker's torchrun launcher is alive."""
    import contextlib

    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cli import UserError

    info = run.info
    ddp = info.world_size > 1 and not cfg.distribute_saes
    for unit in tr.units:
        unit.step_fn = _step_module(unit.sae)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            unit.step_fn = DistributedDataParallel(
                unit.step_fn, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.sae_autocast and info.device.type == "cuda"
                else contextlib.nullcontext())
    wandb_run = None
    if cfg.wandb and info.is_main:
        import wandb

        from lineofsight.run import jsonable

        wandb_run = wandb.init(project=cfg.wandb, config={**jsonable(cfg), "layers": data.layers}, resume="allow")
    what = tr.specs[0].name if len(tr.specs) == 1 else f"{len(tr.specs)} SAEs"
    bar = tqdm(total=tr.n_steps, initial=tr.step, desc=f"SAE {what} {cfg.activation}", disable=not info.is_main,
               mininterval=2)
    index = {s.name: i for i, s in enumerate(tr.specs)}
    t_log, tok_log = time.perf_counter(), tr.tokens_seen
    try:
        while tr.step < tr.n_steps:
            run.check_alive()  # before any work: an orphaned worker writes nothing more
            step = tr.step
            xs, types = route(cfg, data, tr, step, info.rank)
            lr = cfg.lr * lr_factor(step, tr.n_steps, cfg.lr_decay_frac)
            warm = l1_factor(step, tr.n_steps, cfg.l1_warmup_frac)
            logging = tr.step + 1 == tr.n_steps or (tr.step + 1) % cfg.log_every == 0
            # per SAE, [loss, sum of the weights (float64: finite whenever they are), its early-loss sum and count];
            # zeros for SAEs elsewhere, so after the all-reduce every rank judges every SAE alike and they stop together
            health = torch.zeros(len(tr.specs), 4, dtype=torch.float64, device=info.device)
            fired, losses, metrics = {}, torch.zeros(len(tr.specs), 3, device=info.device), {}
            for unit in tr.units:
                terms, fired[unit.spec.name], seen = _unit_step(cfg, unit, xs[unit.spec.layer], warm, lr, autocast)
                i = index[unit.spec.name]
                health[i, 0] = terms[0].double()
                health[i, 1] = _finite_sum(unit.sae.parameters())
                health[i, 2], health[i, 3] = unit.early_loss_sum, unit.early_loss_n
                if logging:
                    losses[i] = terms
                    if unit.spec.reporter() == info.rank:  # the last per-rank batch, as a DDP rank sees it
                        x, x_hat, latents = seen
                        metrics[unit.spec.name] = batch_metrics(x, x_hat, latents, types[-len(x) :],
                                                                unit.sae.cfg.act_scale)
                del seen
            # The updates are kept only if every SAE's loss passes and the weights it made are finite, on every
            # rank: one all-reduce for all SAEs (under DDP the ranks' losses are averaged).
            dist.all_reduce(health)
            if ddp:
                health[:, [0, 2, 3]] /= info.world_size
            for unit_spec, (loss, weights, early_sum, early_n) in zip(tr.specs, health.tolist(), strict=True):
                unit = next((u for u in tr.units if u.spec is unit_spec), None)
                problem = _diverged(cfg, early_sum, early_n, loss) or (
                    None if math.isfinite(weights) else "the update made the SAE's weights non-finite")
                if problem:
                    lam = unit_spec.l1_coefficient * warm
                    raise UserError(f"SAE {unit_spec.name}: {problem} at step {step} (lr {cfg.lr:g}, lambda {lam:.3g}); "
                                    f"stopped without keeping the update. {_last_good(run.out)}")
                if unit is not None and unit.early_loss_n < DIVERGE_EARLY_STEPS:
                    unit.early_loss_sum, unit.early_loss_n = unit.early_loss_sum + loss, unit.early_loss_n + 1
            if ddp and tr.units:  # a latent is alive if it fired on any rank: one all-reduce for all SAEs
                joined = dist.all_reduce(torch.cat([fired[u.spec.name].float() for u in tr.units]), op="max") > 0
                fired = dict(zip([u.spec.name for u in tr.units],
                                 joined.split([u.spec.d_sae for u in tr.units]), strict=True))
            for unit in tr.units:
                unit.since_fired += tr.global_batch
                unit.since_fired[fired[unit.spec.name]] = 0
            tr.step += 1
            tr.tokens_seen += tr.global_batch
            bar.update(1)

            if logging:
                now = time.perf_counter()
                tokens_per_s = (tr.tokens_seen - tok_log) / max(now - t_log, 1e-9)
                log_step(cfg, run, tr, losses, metrics, warm, tokens_per_s, ddp)
                t_log, tok_log = now, tr.tokens_seen
                if info.is_main:
                    _show(bar, tr)
                    if wandb_run is not None:
                        wandb_run.log({f"{n}/{k}": v for n, line in tr.last.items() for k, v in line.items()
                                       if isinstance(v, float)}, step=tr.step)
            if (cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0) or tr.step == tr.n_steps:
                problem = check_before_writing(cfg, tr, xs, warm, autocast, ddp)
                if problem:
                    raise UserError(f"{problem} after the update of step {step} (lr {cfg.lr:g}); "
                                    f"stopped without writing checkpoint step-{tr.step:08d}. {_last_good(run.out)}")
                save_checkpoint(run.out, tr, data.source, info.rank, info.world_size)
            if cfg.step_delay:
                time.sleep(cfg.step_delay)
    finally:  # also on an error: the bar's last redraw must not follow the error line
        bar.close()
        data.source.close()
        # The DDP wrappers go before the process group does (run.finish destroys it): a DDP reducer that
        # outlives its gloo group can abort the process at exit ("terminate called without an active exception").
        for unit in tr.units:
            unit.step_fn = None
    if wandb_run is not None:
        wandb_run.finish()


def _chunks(cfg: Config, x: Any) -> list[Any]:
    """``x`` in per-rank batches of ``--batch-size`` rows: the global batch an SAE gets with --distribute-saes
    is processed as the ranks' batches are under DDP (the same BatchTopK selection, one batch's activations in
    memory at a time); otherwise ``[x]``."""
    return list(x.split(cfg.batch_size)) if len(x) > cfg.batch_size else [x]


def _unit_step(cfg: Config, unit: Unit, x: Any, warm: float, lr: float, autocast: Any
               ) -> tuple[Any, Any, tuple[Any, Any, Any]]:
    """One optimiser step of one SAE on ``x``, its gradient the mean over the per-rank batches of ``x`` (see
    :func:`_chunks`). Returns the loss terms ``[loss, mse, aux]`` (means over the batches), which latents fired
    on any token, and ``(x, x_hat, latents)`` of the last batch, for the log."""
    import torch

    for group in unit.opt.param_groups:
        group["lr"] = lr
    dead = unit.since_fired > cfg.dead_after_tokens if cfg.activation != "relu" else None
    unit.opt.zero_grad(set_to_none=True)
    parts = _chunks(cfg, x)
    terms = torch.zeros(3, device=x.device)
    fired = torch.zeros(unit.spec.d_sae, dtype=torch.bool, device=x.device)
    for part in parts:
        with autocast:
            out = unit.step_fn(part, unit.spec.l1_coefficient * warm, dead)
        (out["loss"] / len(parts) if len(parts) > 1 else out["loss"]).backward()
        latents = out["latents"].detach()
        if cfg.activation == "batchtopk":
            unit.sae.observe_threshold(latents)
        fired |= (latents > 0).any(0)
        terms += torch.stack([out[k].detach().float() for k in ("loss", "mse", "aux")]) / len(parts)
        seen = (part, out["x_hat"].detach(), latents)
        del out
    unit.sae.optimizer_step(unit.opt)
    return terms, fired, seen


def _show(bar: Any, tr: Training) -> None:
    """The progress bar's postfix: one SAE's loss, L0, FVU (by token type), dead share and speed; with several,
    each one's FVU and the largest dead share."""
    if not tr.last:
        return
    if len(tr.specs) == 1:
        last = next(iter(tr.last.values()))
        short = {"image": "img", "text_in_context": "ctx", "text_only": "txt"}
        by_type = {f"{k.split('/')[0]}_{short[k.split('/')[1]]}": f"{v:.3g}" for k, v in last.items() if "/" in k}
        bar.set_postfix(loss=f"{last['loss']:.3g}", l0=f"{last['l0']:.1f}", fvu=f"{last['fvu']:.3f}",
                        dead=f"{last['dead_frac']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}", **by_type)
        return
    fvus = {f"fvu_{n}": f"{line['fvu']:.3f}" for n, line in tr.last.items()}
    worst = max(line["dead_frac"] for line in tr.last.values())
    speed = next(iter(tr.last.values()))["tokens_per_s"]
    bar.set_postfix(**fvus, dead_max=f"{worst:.2f}", tok_s=f"{speed:.0f}")


def _finite_sum(tensors: Any) -> Any:
    """A float64 scalar that is finite exactly when every tensor is (a float64 sum of float32 values
    cannot overflow); one read of each tensor, no copy."""
    import torch

    sums = [t.detach().sum(dtype=torch.float64) for t in tensors]
    return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64)


def _diverged(cfg: Config, early_sum: float, early_n: float, loss: float) -> str | None:
    """Why ``loss`` (an SAE's, mean over the ranks) means it has diverged, or None; the reference is the mean
    of its first losses, ``early_sum / early_n`` (every rank gets it in the health all-reduce)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    early = early_sum / early_n if early_n else 0.0
    if cfg.diverge_factor and early > 0 and loss > cfg.diverge_factor * early:
        return (f"the loss diverged ({loss:.3g}, above --diverge-factor {cfg.diverge_factor:g} x its early value "
                f"{early:.3g}; 0 turns the check off)")
    return None


def check_before_writing(cfg: Config, tr: Training, xs: dict[int, Any], warm: float, autocast: Any,
                         ddp: bool) -> str | None:
    """Before a checkpoint: for every SAE, the loss of the new weights on this step's batch passes
    :func:`_diverged` and the Adam state is finite, on every rank (one forward without gradients each, one
    all-reduce for all); else why not, naming the SAE."""
    import torch

    from lineofsight import dist

    health = torch.zeros(len(tr.specs), 4, dtype=torch.float64, device=xs[next(iter(xs))].device if xs else None)
    index = {s.name: i for i, s in enumerate(tr.specs)}
    for unit in tr.units:
        dead = unit.since_fired > cfg.dead_after_tokens if cfg.activation != "relu" else None
        parts = _chunks(cfg, xs[unit.spec.layer])
        with torch.no_grad(), autocast:
            after = sum(unit.sae.loss(part, l1_coefficient=unit.spec.l1_coefficient * warm, dead_mask=dead)["loss"]
                        for part in parts) / len(parts)
        adam = [v for state in unit.opt.state.values() for v in state.values()
                if torch.is_tensor(v) and v.is_floating_point()]
        early = torch.tensor([unit.early_loss_sum, unit.early_loss_n], dtype=torch.float64, device=health.device)
        health[index[unit.spec.name]] = torch.cat([torch.stack([after.detach().double(), _finite_sum(adam)]), early])
    dist.all_reduce(health)
    if ddp:
        health[:, [0, 2, 3]] /= dist.world_size()
    for spec, (loss, adam, early_sum, early_n) in zip(tr.specs, health.tolist(), strict=True):
        problem = "non-finite Adam state" if not math.isfinite(adam) else _diverged(cfg, early_sum, early_n, loss)
        if problem:
            return f"SAE {spec.name}: {problem}"
    return None


def _last_good(out: Path | None) -> str:
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is None:
        return "Last good checkpoint: none (none was written before)"
    return f"Last good checkpoint: {ckpt} (--resume continues from it)"


def log_step(cfg: Config, run: Run, tr: Training, losses: Any, metrics: dict[str, dict[str, float]], warm: float,
             tokens_per_s: float, ddp: bool) -> None:
    """One log line per SAE (losses averaged over the ranks under DDP; L0 and FVU of the batch its reporting rank
    saw), appended to ``log.jsonl`` by rank 0; ``tr.last`` holds them."""
    from lineofsight import dist

    dist.all_reduce(losses, op="mean" if ddp else "sum")
    parts = dist.all_gather_object({n: (m, float((u.since_fired > cfg.dead_after_tokens).float().mean()))
                                    for n, m in metrics.items() for u in tr.units if u.spec.name == n})
    if not run.is_main:
        return
    got = {n: v for part in parts for n, v in part.items()}
    lines = []
    for i, spec in enumerate(tr.specs):
        m, dead_frac = got[spec.name]
        line = {"step": tr.step, "sae": spec.name, "layer": spec.layer, "tokens": tr.tokens_seen,
                "loss": float(losses[i, 0]), "mse": float(losses[i, 1]), "aux": float(losses[i, 2]),
                "lambda": spec.l1_coefficient * warm, "lr": tr.units[0].opt.param_groups[0]["lr"] if tr.units else None,
                **m, "dead_frac": dead_frac, "tokens_per_s": tokens_per_s}
        tr.last[spec.name] = line
        lines.append(json.dumps(line) + "\n")
    with (run.out / LOG_FILE).open("a") as f:
        f.write("".join(lines))


def finish(cfg: Config, run: Run, data: Data, tr: Training, start: float) -> dict[str, Any]:
    """Each SAE is saved to ``<out>/saes/<name>`` by the rank that reports it; rank 0 writes the metrics (skips
    summed over the ranks); the run ends."""
    from lineofsight import dist
    from lineofsight.data import SkipCounter
    from lineofsight.sae import SAES_DIR

    for unit in tr.units:
        if unit.spec.reporter() == run.info.rank:
            unit.sae.save(run.out / SAES_DIR / unit.spec.name)
    dead = dist.all_gather_object({u.spec.name: (float((u.since_fired > cfg.dead_after_tokens).float().mean()),
                                                 u.sae.cfg.act_scale) for u in tr.units})
    skipped = dist.all_gather_object(data.source.skips.to_dict())
    metrics: dict[str, Any] = {}
    summary = ""
    if run.is_main:
        skips = SkipCounter()
        for s in skipped:
            skips.merge(s)
        dead_scale = {n: v for part in dead for n, v in part.items()}
        per_sae = {}
        for spec in tr.specs:
            last = tr.last.get(spec.name, {})
            per_sae[spec.name] = {
                "layer": spec.layer, "expansion": spec.expansion, "d_sae": spec.d_sae,
                **({"l1_coefficient": spec.l1_coefficient} if cfg.activation == "relu" else {"k": spec.k}),
                "final_loss": last.get("loss"), "l0": last.get("l0"), "fvu": last.get("fvu"),
                "dead_frac": dead_scale[spec.name][0], "by_type": {k: v for k, v in last.items() if "/" in k},
                "act_scale": dead_scale[spec.name][1], "path": str(run.out / SAES_DIR / spec.name),
            }
        first = tr.last.get(tr.specs[0].name, {})
        metrics = {"saes": per_sae, "tokens_seen": tr.tokens_seen, "steps": tr.step,
                   "tokens_per_s": first.get("tokens_per_s"), "wall_s": round(time.perf_counter() - start, 1),
                   "world_size": run.info.world_size, "layers": data.layers,
                   "distribute_saes": cfg.distribute_saes, "skipped": skips.to_dict()}
        each = "; ".join(f"{n} loss {_fmt(m['final_loss'], '.4g')} L0 {_fmt(m['l0'], '.1f')} "
                         f"FVU {_fmt(m['fvu'], '.3f')} dead {m['dead_frac']:.3f}" for n, m in per_sae.items())
        summary = (f"done: {tr.step} steps, {tr.tokens_seen} tokens, {each}, {skips.summary()}; "
                   f"SAE{'s' * (len(per_sae) > 1)} in {run.out / SAES_DIR}")
    dist.barrier()
    run.finish(summary, metrics if run.is_main else None)
    return metrics


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@lifecycle("sae/sae-trainer.py", outputs=OUTPUTS, resumable=True)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    import importlib.util

    from lineofsight.cli import UserError

    start = time.perf_counter()
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb {cfg.wandb}: the wandb package is not installed (pip install wandb)")
    run.setup(seed=cfg.seed, device=cfg.device)
    data = load_data(cfg, run)
    specs = plan_saes(cfg, data.layers, data.d_in, run.info.world_size)
    mine_only(cfg, data, specs, run)
    check_memory(cfg, specs, data, run)
    if cfg.resume:
        check_resume(cfg, run, specs)
    run.open(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    tr = init_training(cfg, run, data, specs)
    if tr.step >= tr.n_steps and (run.out / "metrics.json").is_file():
        data.source.close()
        metrics = json.loads((run.out / "metrics.json").read_text())
        return run.finish(f"{run.out} is already finished ({tr.step} steps); nothing to do", metrics, None)
    from lineofsight import dist

    with dist.guard("a training step"):  # DDP's own collectives (gradient all-reduce in backward)
        train(cfg, run, data, tr)
    return finish(cfg, run, data, tr, start)


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
