"""Harvest residual-stream tokens of captioned images to disk, tagged by token type.

For every ShareGPT4V-format record, the paper's two passes (see ``lineofsight/harvest.py``):
image + "What is shown in this image?" + caption (image tokens and caption tokens kept, template
tokens dropped) and the caption alone. Every requested layer is read in the same forward, which
stops after the deepest one.

Output: ``<out>/tokens-<hash>/`` named by a hash of what determines its contents: ``config.json``
(first), ``shard-00000.safetensors`` ... (``acts [n_tokens, n_layers, d_model]``, ``token_type``
(0 image, 1 text_in_context, 2 text_only), ``sample`` (record index), ``token_id``, ``type_index``
(the j-th image / caption token of its record); the record ids and skipped images in the metadata;
activations in ``--save-dtype``, by default the model's ``--dtype``; each shard is streamed to a temp
file as its forward passes finish, so memory holds one forward's tokens, never a whole shard, and
renamed into place when complete, so a shard exists only when complete), ``metadata.json`` (last:
the cache is complete) and ``run.json`` (the run record:
command, config, git SHA, versions; see ``lineofsight/run.py``). The format is
``lineofsight/cache.py``'s token cache. Re-running the same config reuses a complete cache and
resumes an interrupted one from its complete shards; ``--overwrite`` starts it again. Under
``torchrun`` the ranks take disjoint shards.

    python sae/cache_activations.py --layers 2 4 --out runs/sae-cache                   # toy world
    torchrun --nproc_per_node 8 sae/cache_activations.py --model llava-hf/llava-v1.6-mistral-7b-hf \\
        --dtype bfloat16 --data /data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \\
        --image-root /data/sharegpt4v --layers 8 12 16 20 24 --limit 50000 --out /scratch/sae-cache
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lineofsight.cache import CACHE_OUTPUTS
from lineofsight.models import Dtype
from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle


@dataclasses.dataclass
class Config:
    """Options for token harvesting."""

    model: str = "toy"
    """'toy', an HF id (llava-hf/llava-v1.6-mistral-7b-hf) or a local directory."""
    data: Path = TOY_WORLD_DIR / "sharegpt4v.json"
    """ShareGPT4V-format JSON list of records."""
    image_root: Path | None = None
    """Folder the records' image paths are relative to (default: the JSON file's folder)."""
    layers: tuple[int, ...] = (2,)
    """Residual-stream layers to read: layer L is the input of decoder block L (hidden_states[L]; 0..n_layers)."""
    types: tuple[str, ...] = ("image", "text_in_context", "text_only")
    """Token types to keep."""
    limit: int | None = None
    """Use only the first N records."""
    max_caption_tokens: int = 128
    """Caption tokens kept per pass (longer captions are cut)."""
    records_per_shard: int = 256
    """Records per shard (the unit of resumption and of the torchrun split)."""
    batch_size: int = 8
    """Records per forward pass."""
    load_threads: int = 4
    """Threads that decode the images of the next batches while the model runs (0: none)."""
    resize: int | None = None
    """Resize images to N x N px before the processor (the paper: 336: 1,176 image tokens for LLaVA-NeXT); recorded
    in the cache's key and in every SAE trained on it."""
    dtype: Dtype = "float32"
    """Model dtype."""
    save_dtype: Dtype | None = None
    """dtype of the stored activations (default: --dtype, the model's; a bfloat16 model's tokens take half
    the disk of float32 ones and lose nothing)."""
    device: str | None = None
    """Device: cpu, cuda or cuda:N (default: this rank's GPU if there is one, else cpu)."""
    out: Path = Path("runs/sae-cache")
    """Parent folder of the cache (the cache is <out>/tokens-<hash>), or the cache folder itself."""
    overwrite: bool = False
    """Recompute the cache of this config from scratch (without it, a complete cache is reused and an
    interrupted one resumed)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        for name in ("records_per_shard", "batch_size", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if not self.layers:
            raise UserError("--layers needs at least one layer")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be positive")
        if self.load_threads < 0:
            raise UserError("--load-threads must be >= 0")
        from lineofsight.data import check_resize

        check_resize(self.resize)


@lifecycle("sae/cache_activations.py", outputs=CACHE_OUTPUTS, resumable=True)
def main(cfg: Config, run: Run) -> Path:
    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cache import (
        TOKEN_CACHE_VERSION,
        TokenShardWriter,
        open_cache,
        pending_shards,
        summarise_token_shards,
        write_cache_metadata,
    )
    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter, read_sharegpt4v
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_layer, check_model, text_config
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    info = run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    records = read_sharegpt4v(cfg.data, limit=cfg.limit)
    if not records:
        raise UserError(f"--data {cfg.data} holds no usable records")
    image_root = cfg.image_root or cfg.data.parent
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    for layer in cfg.layers:
        check_layer(model, layer, "--layers")
    layers = sorted(set(cfg.layers))
    save_dtype_name = cfg.save_dtype or cfg.dtype
    save_dtype = getattr(torch, save_dtype_name)
    harvester = Harvester(model, processor, layers, max_caption_tokens=cfg.max_caption_tokens, types=cfg.types,
                          save_dtype=save_dtype)
    harvester.check_boundary(records[0].caption)

    key = {
        "version": TOKEN_CACHE_VERSION,
        "model": model_source,
        "data": str(Path(cfg.data).resolve()),
        "data_mtime_ns": Path(cfg.data).stat().st_mtime_ns,
        "image_root": str(Path(image_root).resolve()),
        "n_records": len(records),
        "layers": layers,
        "types": list(harvester.types),
        "question": harvester.question,
        "max_caption_tokens": cfg.max_caption_tokens,
        "records_per_shard": cfg.records_per_shard,
        "dtype": cfg.dtype,
        "save_dtype": save_dtype_name,
        **({"resize": cfg.resize} if cfg.resize is not None else {}),  # absent: full size (caches from before keep their hash)
    }
    cache, complete = open_cache(run, cfg.out, key, cfg.overwrite, "tokens")
    if complete:
        run.finish(f"reusing the complete cache {cache}")
        return cache

    n_shards = (len(records) + cfg.records_per_shard - 1) // cfg.records_per_shard
    mine, todo = pending_shards(cache, n_shards)
    if len(todo) < len(mine):
        dist.print0(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of rank 0 already done")
    bar = tqdm(total=sum(min(cfg.records_per_shard, len(records) - s * cfg.records_per_shard) for s in todo),
               desc="records", unit="rec", disable=not info.is_main)
    n_tokens = 0
    d_model = text_config(model).hidden_size
    for shard in todo:
        lo, hi = shard * cfg.records_per_shard, min(len(records), (shard + 1) * cfg.records_per_shard)
        skips = SkipCounter()
        seen = 0
        # Each forward's tokens go to the shard file as they come: memory holds one forward, never a shard.
        with TokenShardWriter(cache, shard, len(layers), d_model, save_dtype) as writer:
            for idx, captions, images in record_batches(records, range(lo, hi), image_root, cfg.batch_size, skips,
                                                        cfg.load_threads, resize=cfg.resize,
                                                        prepare=harvester.prepare):
                run.check_alive()
                if idx:
                    writer.add(harvester(captions, images, idx))
                bar.update(len(idx) + skips.total - seen)
                seen = skips.total
            n_tokens += writer.n_tokens
            writer.close(skips.to_dict())
        bar.set_postfix(tokens=n_tokens)
    bar.close()
    dist.barrier()

    summary = summarise_token_shards(cache, n_shards)  # every rank reads the shards' token types (small)
    if summary["n_tokens"] == 0:
        raise UserError(f"no tokens harvested ({summary['skipped_summary']})")
    if info.is_main:
        write_cache_metadata(cache, {"layers": layers, **summary, "n_records": len(records), "key": key})
    dist.barrier()
    run.finish(f"wrote {cache}: {summary['n_tokens']} tokens x {len(layers)} layers x {summary['d_model']} in "
               f"{time.perf_counter() - start:.1f}s; {summary['skipped_summary']}")
    return cache


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
