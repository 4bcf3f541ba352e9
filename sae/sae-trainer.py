"""Train a sparse autoencoder on a VLM's residual stream over captioned images, with torch DDP.

Online mode (default): every rank loads the VLM, reads a disjoint share of the ShareGPT4V records
(reshuffled every epoch), harvests the layer with an early stop (image tokens, caption tokens in
context, caption tokens alone: ``lineofsight/harvest.py``), fills a shuffle buffer and trains
the SAE wrapped in DDP. The shuffle buffer (``OnlineSource``) has a fixed size on the training device
(``--buffer-dtype``, default the model's) and is refilled in place: a step moves one batch of rows,
whatever the buffer's size. ``--activations <cache>`` (from ``sae/cache_activations.py``) trains
from a token cache instead: each step's global batch is a slice of one seeded permutation of
the cache, split between the ranks, so any number of ranks trains on exactly the same batches;
each rank reads only its rows of each batch from the shard files (``lineofsight.cache.TokenRows``),
so memory does not grow with the cache.

Before the first step, rank 0 sets the activation scale (mean norm -> sqrt(d_in)) and ``b_dec``
(the mean) from its buffer and broadcasts them. Schedules follow the paper: lambda warmed up over
the first ``--l1-warmup-frac`` of the steps, the learning rate decayed linearly to 0 over the
last ``--lr-decay-frac``. Every ``--checkpoint-every`` steps an atomic checkpoint holds the SAE,
Adam state, step, dead-latent counters, every rank's data position, shuffle buffer and RNG
state; ``--resume`` continues exactly where it stopped (kill -9 included).

Divergence: every update is checked before it is kept. After each optimiser step one all-reduce
brings the loss and a float64 sum of the SAE's weights from every rank; a non-finite loss or
weight, or a loss above ``--diverge-factor`` times its early value (the mean loss of the first 10
steps), stops the run with a one-line error naming the last good checkpoint, before anything more
is written. A checkpoint (and the final SAE) is written only after the new weights pass the same
test on the step's batch and the Adam state is finite, so no checkpoint ever holds a diverged or
non-finite state, and ``--resume`` continues from the one named (``--diverge-factor`` may change
on resume). Under torchrun a collective that waits longer than ``$LINEOFSIGHT_DIST_TIMEOUT_S``
(default 1800 s) for a frozen or lost rank stops the run with a one-line error naming the rank
(``lineofsight/dist.py``), and a worker whose launcher has died stops before its next step, so the
last checkpoint stays intact.

The run folder ``--out`` follows ``lineofsight/run.py``: refused when it holds a run unless
``--resume`` or ``--overwrite`` (which removes the earlier run's outputs only after the inputs are
validated), locked while the run lasts, and recorded in ``run.json`` (command, config, git SHA,
versions, status). It ends with ``sae/`` (the SAE: ``sae.safetensors`` + ``cfg.json``),
``metrics.json``, ``log.jsonl`` and ``checkpoints/``.

    python sae/sae-trainer.py --layer 2 --total-tokens 2000000 --out runs/sae      # toy, CPU
    torchrun --nproc_per_node 2 sae/sae-trainer.py --layer 2 --out runs/sae-ddp     # gloo on CPU
    torchrun --nproc_per_node 8 sae/sae-trainer.py --model llava-hf/llava-v1.6-mistral-7b-hf \\
        --dtype bfloat16 --data /data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \\
        --image-root /data/sharegpt4v --layer 8 --expansion 8 --l1-coefficient 5 --lr 5e-5 \\
        --batch-size 4096 --total-tokens 400000000 --out /scratch/sae-l8
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
OUTPUTS = ("sae", "metrics.json", LOG_FILE, "checkpoints")
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
    layer: int | None = None
    """Residual-stream layer: the input of decoder block L (hidden_states[L]). Default: 8 (the paper's) for a model
    with at least 16 layers, else n_layers // 2; with --activations, the cache's first layer."""
    types: tuple[str, ...] = ("image", "text_in_context", "text_only")
    """Token types to train on."""
    activation: Literal["relu", "topk", "batchtopk"] = "relu"
    """relu (April-update objective), topk or batchtopk."""
    expansion: int = 8
    """d_sae = expansion x d_model (the paper: 8)."""
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient lambda (relu; the paper: 5)."""
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

        for name in ("expansion", "batch_size", "total_tokens", "buffer_batches", "records_per_forward", "k"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be positive")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise UserError("--log-every must be positive and --checkpoint-every >= 0")
        # Non-finite numbers first, in the words of lineofsight.cli.check_finite (NaN fails every comparison).
        for name in ("lr", "l1_coefficient", "l1_warmup_frac", "lr_decay_frac", "diverge_factor", "step_delay"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: not a finite number")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.l1_coefficient < 0:
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


# Fields that must agree between a run and its --resume (the rest may change, e.g. --log-every). The
# layer is compared with the checkpoint's SAE instead: a default (None) resolves to a number.
RESUME_KEYS = ("model", "data", "limit", "activations", "types", "activation", "expansion", "k", "l1_coefficient",
               "l1_warmup_frac", "lr", "lr_decay_frac", "batch_size", "total_tokens", "buffer_batches",
               "buffer_dtype", "records_per_forward", "max_caption_tokens", "dead_after_tokens", "aux_k", "seed")


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

    **The buffer** is ``acts [C, d_model]`` in ``--buffer-dtype`` and ``types [C]`` on the training
    device, C = ``--buffer-batches`` x ``--batch-size``, allocated once and then only written in
    place. It is filled by the first harvests; then each step draws B = ``--batch-size`` distinct
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
        self.acts: Any = None
        """``[C, d_model]`` in ``--buffer-dtype`` on the device; allocated at the first harvest (d_model known)."""
        self.types = torch.zeros(self.capacity, dtype=torch.uint8, device=self.device)
        self.n_filled = 0
        """Slots filled so far (C once the first fill is done)."""
        self.stage_acts: Any = None
        """``[S, d_model]``: the tokens of the last harvest not yet in the buffer (S <= one harvest)."""
        self.stage_types = torch.zeros(0, dtype=torch.uint8, device=self.device)
        self.image_root = cfg.image_root or cfg.data.parent
        self._order: list[int] | None = None
        self.loader = ImageLoader(records, self.image_root, cfg.load_threads)

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
            self.stage_acts = got.acts[:, 0].to(self.device, self.dtype)
            self.stage_types = got.token_type.to(self.device, torch.uint8)
            if self.acts is None:
                self.acts = torch.zeros(self.capacity, self.stage_acts.shape[1], dtype=self.dtype, device=self.device)
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
        """``(x [B, d_model] float32, types [B])`` on the device; see the class docstring."""
        import torch

        self.fill()
        slots = torch.randperm(self.capacity, generator=self.gen)[: self.cfg.batch_size].to(self.device)
        x, t = self.acts[slots].float(), self.types[slots]  # copies, taken before the slots are refilled
        self._write(slots)
        return x, t

    def peek(self, n: int) -> Any:
        self.fill()
        return self.acts[:n].float()

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, JSON) of this rank's buffer, staging area, RNG and data position."""
        tensors = {"buffer_acts": self.acts, "buffer_types": self.types, "stage_acts": self.stage_acts.clone(),
                   "stage_types": self.stage_types.clone(), "gen_state": self.gen.get_state()}
        meta = {"epoch": self.epoch, "cursor": self.cursor, "n_filled": self.n_filled,
                "skipped": self.skips.to_dict()}
        return tensors, meta

    def load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        from lineofsight.cli import UserError

        if "stage_acts" not in tensors or len(tensors["buffer_types"]) != self.capacity:
            raise UserError("--resume: the checkpoint holds a shuffle buffer of an older trainer (it grew and shrank); "
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
    """The layer's tokens from a cache; global batch ``step`` is a fixed slice of one seeded permutation
    per epoch, and rank r takes its r-th part. ``acts`` is a :class:`lineofsight.cache.TokenRows` (each
    step reads just this rank's rows from the shard files) or an in-memory ``[N, d_model]`` tensor."""

    def __init__(self, cfg: Config, acts: Any, types: Any, rank: int, world: int, device: Any) -> None:
        from lineofsight.data import SkipCounter

        self.cfg, self.acts, self.types = cfg, acts, types
        self.rank, self.world, self.device = rank, world, device
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
            if epoch != self._perm_epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
            out += self._perm[offset : offset + self.global_batch - len(out)].tolist()
        return torch.tensor(out)

    def next_batch(self, step: int) -> tuple[Any, Any]:
        import torch

        idx = self._global_indices(step)[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        return self.acts[idx].to(self.device, torch.float32), self.types[idx].to(self.device)

    def peek(self, n: int) -> Any:
        import torch

        return self.acts[self._global_indices(0)[:n]].to(torch.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def load_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, sae: Any, opt: Any, since_fired: Any, source: Any, extra: dict[str, Any],
                    rank: int, world: int) -> None:
    """``out/checkpoints/step-<N>/`` with one file per rank, then ``state.json`` (rank 0, last),
    then ``out/checkpoints/latest`` pointing at it; older checkpoints are removed after that."""
    import shutil

    import torch

    from lineofsight import dist
    from lineofsight.io import atomic_write_text, save_tensors, write_json

    folder = out / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    data_tensors, data_meta = source.state()
    tensors = {f"data.{k}": v for k, v in data_tensors.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(folder / f"rank{rank:03d}.safetensors", tensors, {"data": json.dumps(data_meta)})
    dist.barrier()
    if rank == 0:
        state = {f"sae.{k}": v for k, v in sae.state_dict().items()}
        state["since_fired"] = since_fired
        opt_state = opt.state_dict()
        for i, s in opt_state["state"].items():
            for name, value in s.items():
                state[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_tensors(folder / "trainer.safetensors", state)
        write_json(folder / "state.json", {
            "step": step, "world_size": world, "sae_cfg": sae.cfg.to_json(),
            "opt_param_groups": opt_state["param_groups"], "opt_keys": {str(i): list(s) for i, s in opt_state["state"].items()},
            **extra,
        })
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


def load_checkpoint(folder: Path, sae: Any, opt: Any, source: Any, rank: int) -> tuple[dict[str, Any], Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns (state.json, since_fired)."""
    import torch

    from lineofsight.io import load_tensors, open_tensors, read_json, tensors_metadata
    from lineofsight.sae import SAEConfig

    # A damaged checkpoint (truncated by a full disk, edited by hand) is a one-line error naming the file.
    state = read_json(folder / "state.json", "checkpoint state",
                      required={"sae_cfg": "object", "opt_param_groups": "list", "opt_keys": "object"})
    trainer = load_tensors(folder / "trainer.safetensors", "checkpoint", ["since_fired"])
    sae.cfg.act_scale = SAEConfig.from_json(state["sae_cfg"]).act_scale
    sae.cfg.threshold = state["sae_cfg"]["threshold"]
    sae.load_state_dict({k[4:]: v for k, v in trainer.items() if k.startswith("sae.")})
    opt_state = {"state": {}, "param_groups": state["opt_param_groups"]}
    for i, keys in state["opt_keys"].items():
        opt_state["state"][int(i)] = {name: trainer[f"opt.{i}.{name}"] for name in keys}
    opt.load_state_dict(opt_state)
    rank_file = folder / f"rank{rank:03d}.safetensors"
    with open_tensors(rank_file, "checkpoint") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        data_meta = tensors_metadata(f, rank_file, "checkpoint", "data")
    source.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("data.")}, data_meta)
    torch.set_rng_state(tensors["rng.torch"])
    return state, trainer["since_fired"]


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
# The run, stage by stage: data, SAE (new or resumed), training loop, finish
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """What the data stage hands on: this rank's token source and what the SAE reads."""

    source: Any
    """:class:`OnlineSource` or :class:`CacheSource`."""
    layer: int
    """The residual-stream layer (input of decoder block ``layer``)."""
    d_in: int
    """Width of the residual stream."""
    model: str
    """The model the tokens come from (resolved path or HF id)."""
    hook_name: str = ""
    """The module whose input is read (online mode; empty for a cache)."""


@dataclasses.dataclass
class Training:
    """What a checkpoint saves and restores, and the length of the schedule."""

    sae: Any
    opt: Any
    since_fired: Any
    """``[d_sae]`` tokens (all ranks) since each latent last fired."""
    n_steps: int
    global_batch: int
    """Tokens per step over all ranks."""
    step: int = 0
    tokens_seen: int = 0
    early_loss_sum: float = 0.0
    """Sum of the losses of the first :data:`DIVERGE_EARLY_STEPS` steps (so far): ``--diverge-factor``'s reference."""
    early_loss_n: int = 0
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The latest log line (rank 0)."""

    def extra(self) -> dict[str, Any]:
        """What ``state.json`` holds besides the step: the tokens seen and the divergence reference."""
        return {"tokens_seen": self.tokens_seen, "early_loss_sum": self.early_loss_sum,
                "early_loss_n": self.early_loss_n}


def load_data(cfg: Config, run: Run) -> Data:
    """The token source of this rank: a token cache read row by row, or the VLM harvesting its records."""
    from lineofsight.cli import UserError
    from lineofsight.toy import ensure_toy_world

    info = run.info
    if cfg.activations is not None:
        from lineofsight.cache import open_token_cache

        rows = open_token_cache(cfg.activations, cfg.layer, cfg.types)  # read lazily, step by step
        source = CacheSource(cfg, rows, rows.types, info.rank, info.world_size, info.device)
        return Data(source, rows.layer, rows.d_model, rows.meta["key"]["model"])

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
    layer = cfg.layer if cfg.layer is not None else (8 if n >= 16 else n // 2)
    check_layer(model, layer)
    import torch

    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens, types=cfg.types,
                          save_dtype=getattr(torch, cfg.buffer_dtype or cfg.dtype))
    harvester.check_boundary(records[0].caption)
    source = OnlineSource(cfg, harvester, records, info.rank, info.world_size, info.device)
    return Data(source, layer, text_config(model).hidden_size, model_source, residual_site(model, layer))


def check_resume(cfg: Config, run: Run, data: Data) -> None:
    """``--resume`` of a run with a checkpoint: the same :data:`RESUME_KEYS`, layer and world size.

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
    state = json.loads((ckpt / "state.json").read_text())
    if state["sae_cfg"].get("layer") != data.layer:
        changed.append("layer")
    if changed:
        raise UserError(f"--resume: the run in {out} was started with different {', '.join(changed)}")
    if state["world_size"] != run.info.world_size:
        raise UserError(f"--resume: the checkpoint was written by {state['world_size']} ranks, "
                        f"not {run.info.world_size}")


def init_training(cfg: Config, run: Run, data: Data) -> Training:
    """The SAE and Adam: restored from the latest checkpoint when resuming, else new with the
    data-dependent init (scale and ``b_dec`` from rank 0's first tokens, broadcast)."""
    import torch

    from lineofsight import dist
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    info = run.info
    global_batch = cfg.batch_size * info.world_size
    sae_cfg = SAEConfig(d_in=data.d_in, d_sae=cfg.expansion * data.d_in, activation=cfg.activation, k=cfg.k,
                        l1_coefficient=cfg.l1_coefficient, aux_k=cfg.aux_k, dead_after_tokens=cfg.dead_after_tokens,
                        model=data.model, layer=data.layer, hook_name=data.hook_name, token_types=cfg.types)
    sae = SparseAutoencoder(sae_cfg, seed=cfg.seed).to(info.device)
    tr = Training(sae=sae, opt=torch.optim.Adam(sae.parameters(), lr=cfg.lr),
                  since_fired=torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=info.device),
                  n_steps=max(1, cfg.total_tokens // global_batch), global_batch=global_batch)
    ckpt = latest_checkpoint(run.out) if run.resumed else None
    if ckpt is not None:
        state, since_fired = load_checkpoint(ckpt, sae, tr.opt, data.source, info.rank)
        tr.step, tr.tokens_seen, tr.since_fired = state["step"], state["tokens_seen"], since_fired.to(info.device)
        # checkpoints from before the divergence check have no reference: it is measured again from here
        tr.early_loss_sum, tr.early_loss_n = state.get("early_loss_sum", 0.0), state.get("early_loss_n", 0)
        dist.print0(f"resumed from {ckpt} at step {tr.step}/{tr.n_steps}")
    else:
        if cfg.resume:
            dist.print0(f"--resume: no checkpoint in {run.out}; starting from scratch")
        if info.is_main:
            sample = data.source.peek(cfg.batch_size * cfg.buffer_batches).to(info.device)
            sae.set_scale_from(sample)
            sae.init_b_dec(sample)
        scale = dist.broadcast(torch.tensor([sae.cfg.act_scale], dtype=torch.float64, device=info.device))
        sae.cfg.act_scale = float(scale[0])
        for p in sae.parameters():
            dist.broadcast(p.data)
    if run.resumed and run.is_main:
        tr.last = trim_log(run.out / LOG_FILE, tr.step)
    return tr


def trim_log(path: Path, step: int) -> dict[str, Any]:
    """Drop the log lines of steps after ``step`` (written after the checkpoint a resume starts
    from; they will be written again); returns the last line kept."""
    from lineofsight.io import atomic_write_text

    if not path.is_file():
        return {}
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return json.loads(kept[-1]) if kept else {}


def train(cfg: Config, run: Run, data: Data, tr: Training) -> None:
    """Steps ``tr.step`` .. ``tr.n_steps``: DDP step, schedules, dead-latent counts, log lines,
    checkpoints. Every step first checks that this worker's torchrun launcher is alive."""
    import contextlib

    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cli import UserError

    info, sae, opt = run.info, tr.sae, tr.opt
    trainer = _step_module(sae)
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(trainer, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.sae_autocast and info.device.type == "cuda"
                else contextlib.nullcontext())
    wandb_run = None
    if cfg.wandb and info.is_main:
        import wandb

        from lineofsight.run import jsonable

        wandb_run = wandb.init(project=cfg.wandb, config={**jsonable(cfg), "layer": data.layer}, resume="allow")
    bar = tqdm(total=tr.n_steps, initial=tr.step, desc=f"SAE L{data.layer} {cfg.activation}",
               disable=not info.is_main, mininterval=2)
    t_log, tok_log = time.perf_counter(), tr.tokens_seen
    try:
        while tr.step < tr.n_steps:
            run.check_alive()  # before any work: an orphaned worker writes nothing more
            step = tr.step
            x, types = data.source.next_batch(step)
            lam = cfg.l1_coefficient * l1_factor(step, tr.n_steps, cfg.l1_warmup_frac)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, tr.n_steps, cfg.lr_decay_frac)
            dead = tr.since_fired > cfg.dead_after_tokens
            with autocast:
                out = trainer(x, lam, dead if cfg.activation != "relu" else None)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            sae.optimizer_step(opt)
            # The update is kept only if the loss it came from passes and the weights it made are finite, on
            # every rank: one all-reduce of [loss, sum of the weights] (float64: finite whenever they are).
            weights = _finite_sum(sae.parameters())
            health = dist.all_reduce(torch.stack([out["loss"].detach().double(), weights]))
            loss = float(health[0]) / info.world_size
            problem = _diverged(cfg, tr, loss) or (None if math.isfinite(float(health[1]))
                                                   else "the update made the SAE's weights non-finite")
            if problem:
                raise UserError(f"{problem} at step {step} (lr {cfg.lr:g}, lambda {lam:.3g}); "
                                f"stopped without keeping the update. {_last_good(run.out)}")
            if tr.early_loss_n < DIVERGE_EARLY_STEPS:
                tr.early_loss_sum, tr.early_loss_n = tr.early_loss_sum + loss, tr.early_loss_n + 1
            latents = out["latents"].detach()
            if cfg.activation == "batchtopk":
                sae.observe_threshold(latents)
            fired = dist.all_reduce((latents > 0).any(0).float(), op="max") > 0
            tr.since_fired += tr.global_batch
            tr.since_fired[fired] = 0
            tr.step += 1
            tr.tokens_seen += tr.global_batch
            bar.update(1)

            if tr.step % cfg.log_every == 0 or tr.step == tr.n_steps:
                now = time.perf_counter()
                tokens_per_s = (tr.tokens_seen - tok_log) / max(now - t_log, 1e-9)
                tr.last = log_step(cfg, run, tr, x, types, out, latents, lam, tokens_per_s)
                t_log, tok_log = now, tr.tokens_seen
                if info.is_main:
                    short = {"image": "img", "text_in_context": "ctx", "text_only": "txt"}
                    by_type = {f"{k.split('/')[0]}_{short[k.split('/')[1]]}": f"{v:.3g}"
                               for k, v in tr.last.items() if "/" in k}
                    last = tr.last
                    bar.set_postfix(loss=f"{last['loss']:.3g}", l0=f"{last['l0']:.1f}", fvu=f"{last['fvu']:.3f}",
                                    dead=f"{last['dead_frac']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}", **by_type)
                    if wandb_run is not None:
                        wandb_run.log(tr.last, step=tr.step)
            if (cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0) or tr.step == tr.n_steps:
                problem = check_before_writing(cfg, tr, x, lam, dead, autocast)
                if problem:
                    raise UserError(f"{problem} after the update of step {step} (lr {cfg.lr:g}, lambda {lam:.3g}); "
                                    f"stopped without writing checkpoint step-{tr.step:08d}. {_last_good(run.out)}")
                save_checkpoint(run.out, tr.step, sae, opt, tr.since_fired, data.source, tr.extra(),
                                info.rank, info.world_size)
            if cfg.step_delay:
                time.sleep(cfg.step_delay)
    finally:  # also on an error: the bar's last redraw must not follow the error line
        bar.close()
        data.source.close()
    if wandb_run is not None:
        wandb_run.finish()


def _finite_sum(tensors: Any) -> Any:
    """A float64 scalar that is finite exactly when every tensor is (a float64 sum of float32 values
    cannot overflow); one read of each tensor, no copy."""
    import torch

    sums = [t.detach().sum(dtype=torch.float64) for t in tensors]
    return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64)


def _diverged(cfg: Config, tr: Training, loss: float) -> str | None:
    """Why ``loss`` (mean over the ranks) means the run has diverged, or None."""
    if not math.isfinite(loss):
        return "non-finite loss"
    early = tr.early_loss_sum / tr.early_loss_n if tr.early_loss_n else 0.0
    if cfg.diverge_factor and early > 0 and loss > cfg.diverge_factor * early:
        return (f"the loss diverged ({loss:.3g}, above --diverge-factor {cfg.diverge_factor:g} x its early value "
                f"{early:.3g}; 0 turns the check off)")
    return None


def check_before_writing(cfg: Config, tr: Training, x: Any, lam: float, dead: Any, autocast: Any) -> str | None:
    """Before a checkpoint: the loss of the new weights on this step's batch passes :func:`_diverged` and
    the Adam state is finite, on every rank (one forward without gradients, one all-reduce); else why not."""
    import torch

    from lineofsight import dist

    sae, opt = tr.sae, tr.opt
    with torch.no_grad(), autocast:
        after = sae.loss(x, l1_coefficient=lam, dead_mask=dead if cfg.activation != "relu" else None)["loss"]
    adam = [v for state in opt.state.values() for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point()]
    health = dist.all_reduce(torch.stack([after.detach().double(), _finite_sum(adam)]))
    if not math.isfinite(float(health[1])):
        return "non-finite Adam state"
    return _diverged(cfg, tr, float(health[0]) / dist.world_size())


def _last_good(out: Path | None) -> str:
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is None:
        return "Last good checkpoint: none (none was written before)"
    return f"Last good checkpoint: {ckpt} (--resume continues from it)"


def log_step(cfg: Config, run: Run, tr: Training, x: Any, types: Any, out: dict[str, Any], latents: Any,
             lam: float, tokens_per_s: float) -> dict[str, Any]:
    """One log line (losses averaged over the ranks; L0 and FVU of this rank's batch), appended
    to ``log.jsonl`` by rank 0."""
    import torch

    from lineofsight import dist

    m = batch_metrics(x, out["x_hat"].detach(), latents, types, tr.sae.cfg.act_scale)
    losses = dist.all_reduce(torch.stack([out[k].detach().float() for k in ("loss", "mse", "aux")]), op="mean")
    line = {"step": tr.step, "tokens": tr.tokens_seen, "loss": float(losses[0]), "mse": float(losses[1]),
            "aux": float(losses[2]), "lambda": lam, "lr": tr.opt.param_groups[0]["lr"], **m,
            "dead_frac": float((tr.since_fired > cfg.dead_after_tokens).float().mean()), "tokens_per_s": tokens_per_s}
    if run.is_main:
        with (run.out / LOG_FILE).open("a") as f:
            f.write(json.dumps(line) + "\n")
    return line


def finish(cfg: Config, run: Run, data: Data, tr: Training, start: float) -> dict[str, Any]:
    """Rank 0 saves the SAE to ``<out>/sae`` and the metrics (skips summed over the ranks); the run ends."""
    from lineofsight import dist
    from lineofsight.data import SkipCounter

    skipped = dist.all_gather_object(data.source.skips.to_dict())
    metrics: dict[str, Any] = {}
    summary = ""
    if run.is_main:
        skips = SkipCounter()
        for s in skipped:
            skips.merge(s)
        tr.sae.save(run.out / "sae")
        last = tr.last
        metrics = {
            "final_loss": last.get("loss"), "l0": last.get("l0"), "fvu": last.get("fvu"),
            "dead_frac": float((tr.since_fired > cfg.dead_after_tokens).float().mean()),
            "tokens_seen": tr.tokens_seen, "steps": tr.step, "tokens_per_s": last.get("tokens_per_s"),
            "wall_s": round(time.perf_counter() - start, 1), "world_size": run.info.world_size, "layer": data.layer,
            "by_type": {k: v for k, v in last.items() if "/" in k}, "skipped": skips.to_dict(),
            "act_scale": tr.sae.cfg.act_scale,
        }
        summary = (f"done: {tr.step} steps, {tr.tokens_seen} tokens, loss {_fmt(metrics['final_loss'], '.4g')}, "
                   f"L0 {_fmt(metrics['l0'], '.1f')}, FVU {_fmt(metrics['fvu'], '.3f')}, dead {metrics['dead_frac']:.3f}, "
                   f"{skips.summary()}; SAE in {run.out / 'sae'}")
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
    d_sae = cfg.expansion * data.d_in
    if cfg.activation != "relu" and cfg.k > d_sae:
        raise UserError(f"--k {cfg.k} is more than the SAE's {d_sae} latents (--expansion {cfg.expansion} "
                        f"x the width {data.d_in} of layer {data.layer})")
    if cfg.resume:
        check_resume(cfg, run, data)
    run.open(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    tr = init_training(cfg, run, data)
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
