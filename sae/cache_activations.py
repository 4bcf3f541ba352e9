"""Harvest residual-stream tokens of captioned images to disk, tagged by token type.

For every ShareGPT4V-format record, the paper's two passes (see ``lineofsight/harvest.py``):
image + "What is shown in this image?" + caption (image tokens and caption tokens kept, template
tokens dropped) and the caption alone. Every requested layer is read in the same forward, which
stops after the deepest one.

Output: ``<out>/tokens-<hash>/`` named by a hash of what determines its contents: ``config.json``
(first), ``shard-00000.safetensors`` ... (``acts [n_tokens, n_layers, d_model]``, ``token_type``
(0 image, 1 text_in_context, 2 text_only), ``sample`` (record index), ``token_id``, ``type_index``
(the j-th image / caption token of its record); the record ids
and skipped images in the metadata; each written atomically, so a shard exists only when
complete) and ``metadata.json`` (last: the cache is complete). Re-running resumes from the
complete shards; under ``torchrun`` the ranks take disjoint shards.

    python sae/cache_activations.py --layers 2 4 --out runs/sae-cache                   # toy world
    torchrun --nproc_per_node 8 sae/cache_activations.py --model llava-hf/llava-v1.6-mistral-7b-hf \\
        --dtype bfloat16 --data /data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json \\
        --image-root /data/sharegpt4v --layers 8 12 16 20 24 --limit 50000 --out /scratch/sae-cache
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

from lineofsight.toy import TOY_WORLD_DIR

CACHE_VERSION = 1


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
    """Residual-stream layers to read (input of decoder block L; 0..n_layers)."""
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype."""
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the stored activations."""
    device: str | None = None
    """Device (default: this rank's GPU if there is one, else cpu)."""
    out: Path = Path("runs/sae-cache")
    """Parent folder of the cache (the cache is <out>/tokens-<hash>)."""
    overwrite: bool = False
    """Delete and recompute an existing cache of this config."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        for name in ("records_per_shard", "batch_size", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if not self.layers:
            raise UserError("--layers needs at least one layer")


def main(cfg: Config) -> Path:

    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cache import open_cache, pending_shards, shard_path
    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter, read_sharegpt4v
    from lineofsight.harvest import TOKEN_TYPES, Harvester, TokenBatch, record_batches
    from lineofsight.io import provenance, save_tensors, write_json
    from lineofsight.models import check_layer, load_vlm, resolve_model_path

    start = time.perf_counter()
    info = dist.setup(seed=0, device=cfg.device)
    from lineofsight.toy import ensure_toy_world

    ensure_toy_world(cfg.data)
    records = read_sharegpt4v(cfg.data, limit=cfg.limit)
    if not records:
        raise UserError(f"--data {cfg.data} holds no usable records")
    image_root = cfg.image_root or cfg.data.parent
    model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=info.device)
    for layer in cfg.layers:
        check_layer(model, layer, "--layers")
    layers = sorted(set(cfg.layers))
    harvester = Harvester(model, processor, layers, max_caption_tokens=cfg.max_caption_tokens, types=cfg.types,
                          save_dtype=getattr(torch, cfg.save_dtype))
    harvester.check_boundary(records[0].caption)

    key = {
        "version": CACHE_VERSION,
        "model": resolve_model_path(cfg.model),
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
        "save_dtype": cfg.save_dtype,
    }
    cache, complete = open_cache(cfg.out, key, cfg.overwrite, "tokens", None)
    if complete:
        dist.print0(f"reusing the complete cache {cache}")
        dist.cleanup()
        return cache

    n_shards = (len(records) + cfg.records_per_shard - 1) // cfg.records_per_shard
    mine, todo = pending_shards(cache, n_shards)
    if len(todo) < len(mine):
        dist.print0(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of rank 0 already done")
    bar = tqdm(total=sum(min(cfg.records_per_shard, len(records) - s * cfg.records_per_shard) for s in todo),
               desc="records", unit="rec", disable=not info.is_main)
    n_tokens = 0
    for shard in todo:
        lo, hi = shard * cfg.records_per_shard, min(len(records), (shard + 1) * cfg.records_per_shard)
        skips = SkipCounter()
        parts = []
        seen = 0
        batches = record_batches(records, range(lo, hi), image_root, cfg.batch_size, skips, cfg.load_threads)
        for idx, captions, images in batches:
            if idx:
                parts.append(harvester(captions, images, idx))
            bar.update(len(idx) + skips.total - seen)
            seen = skips.total
        batch = TokenBatch.cat(parts) if parts else TokenBatch(
            torch.zeros(0, len(layers), model.config.get_text_config(decoder=True).hidden_size),
            torch.zeros(0, dtype=torch.uint8), *(torch.zeros(0, dtype=torch.long) for _ in range(3)))
        n_tokens += len(batch)
        save_tensors(shard_path(cache, shard), batch.to_dict(), {"skipped": json.dumps(skips.to_dict())})
        bar.set_postfix(tokens=n_tokens)
    bar.close()
    dist.barrier()

    from safetensors import safe_open

    skips, counts, shards = SkipCounter(), [0] * len(TOKEN_TYPES), []
    d_model = None
    for shard in range(n_shards):
        path = shard_path(cache, shard)
        with safe_open(str(path), framework="pt") as f:
            skips.merge(json.loads(f.metadata()["skipped"]))
            types = f.get_tensor("token_type")
            d_model = f.get_slice("acts").get_shape()[2]
        for t, n in enumerate(torch.bincount(types.long(), minlength=len(TOKEN_TYPES)).tolist()):
            counts[t] += n
        shards.append(path.name)
    if sum(counts) == 0:
        dist.cleanup()
        raise UserError(f"no tokens harvested ({skips.summary()})")
    if info.is_main:
        write_json(cache / "metadata.json", {
            "layers": layers, "d_model": d_model, "token_types": list(TOKEN_TYPES),
            "n_tokens": sum(counts), "n_tokens_by_type": dict(zip(TOKEN_TYPES, counts, strict=True)),
            "n_records": len(records), "shards": shards, "skipped": skips.to_dict(),
            "skipped_summary": skips.summary(), "key": key, "provenance": provenance(),
        })
    dist.barrier()
    dist.print0(f"wrote {cache}: {sum(counts)} tokens x {len(layers)} layers x {d_model} in "
                f"{time.perf_counter() - start:.1f}s; {skips.summary()}")
    dist.cleanup()
    return cache


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
