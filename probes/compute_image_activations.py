"""Pooled residual-stream activations of a VLM over ImageNet-layout images, per layer, cached on disk.

For each image: one forward pass with the prompt (default the bare ``<image>`` prompt), every
requested layer traced at once, stopping after the deepest one; the residual at each layer is
pooled over the image-token positions (default), every position, or the last position.

Output: a cache folder ``<out>/acts-<hash>`` named by a hash of everything that determines its
contents, holding ``config.json`` (written first), ``shard-00000.safetensors`` ... (each holds
``acts`` ``[n_images, n_layers, d_model]``, ``labels``, ``item_index``, and its image paths and
skipped files in the safetensors metadata; written atomically, so a shard file exists only when
complete) and ``metadata.json`` (written last: the cache is complete). Re-running with the same
config reuses a complete cache and resumes an interrupted one from its complete shards. Under
``torchrun`` the ranks take disjoint shards and rank 0 writes ``metadata.json``.

Toy world (the default)::

    python probes/compute_image_activations.py --out runs/acts

ImageNet and the 7B on a GPU node (paper: 100 single-word classes x 500 images, 336 px)::

    torchrun --nproc_per_node 8 probes/compute_image_activations.py \\
        --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 --imagenet-dir /data/imagenet \\
        --split train --classes data/single_word_classes.txt --images-per-class 500 --resize 336 \\
        --batch-size 16 --out runs/acts
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.cache import CACHE_OUTPUTS
from lineofsight.models import Dtype
from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle

PAPER_LAYERS = (5, 8, 12, 16, 20, 24)
CACHE_VERSION = 1


@dataclasses.dataclass
class Config:
    """Options for activation extraction."""

    model: str = "toy"
    """Model: 'toy' (the embedded default), an HF id (llava-hf/llava-v1.6-mistral-7b-hf) or a local directory."""
    imagenet_dir: Path = TOY_WORLD_DIR / "imagenet"
    """ImageNet-layout root: <root>/<split>/<wnid>/* and <root>/imagenet_class_index.json."""
    split: str = "train"
    """Split folder under --imagenet-dir."""
    classes: str = "all"
    """'all', a number N (the first N classes of the index), or a file with one class name per line."""
    images_per_class: int = 500
    """At most this many images per class (sorted file names; the paper used 500)."""
    layers: tuple[int, ...] = ()
    """Layers to read; layer L = input of decoder block L = hidden_states[L], valid 0..n_layers. Default: the paper's 5 8 12 16 20 24 for a 32-layer model, else every layer 0..n_layers."""
    pool: Literal["image", "all", "last"] = "image"
    """'image': mean over image-token positions; 'all': mean over every non-pad position (the seed's behaviour, includes BOS); 'last': the last position."""
    prompt: str | None = None
    """Prompt text given to the processor; must contain the model's image placeholder once. Default: the image alone
    (LLaVA's bare <image>; lineofsight.models.image_prompt)."""
    resize: int | None = None
    """Resize every image to this square size first (the paper: 336); default keeps the original size."""
    batch_size: int = 16
    """Images per forward pass."""
    shard_size: int = 256
    """Images per cache shard (the unit of resumption)."""
    dtype: Dtype = "float32"
    """Model dtype."""
    save_dtype: Dtype = "float32"
    """dtype of the cached activations."""
    device: str | None = None
    """Device (default: this rank's GPU if there is one, else cpu)."""
    num_workers: int = 0
    """DataLoader workers that decode, resize and preprocess (processor) the next batches while the model runs; 0 does it in the main process. On a GPU node use several."""
    out: Path = Path("runs/acts")
    """Parent folder of the cache (the cache is <out>/acts-<hash>), or an existing cache folder."""
    overwrite: bool = False
    """Recompute the cache of this config from scratch (only a cache this script wrote is removed). Without it, a complete cache is reused and an interrupted one resumed."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        for name in ("images_per_class", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        from lineofsight.data import check_resize

        check_resize(self.resize)
        if self.num_workers < 0:
            raise UserError("--num-workers must be >= 0")


# ---------------------------------------------------------------------------------------------
# Cache layout
# ---------------------------------------------------------------------------------------------


def cache_key(cfg: Config, model_source: str, labels: list[int], layers: list[int], n_items: int,
              items_digest: str) -> dict[str, Any]:
    """Everything that determines the cache's contents (not how fast it is computed).

    ``items_digest`` fingerprints the image files (path, size, mtime), so a regenerated or
    edited dataset gets a new cache instead of a stale one.
    """
    return {
        "version": CACHE_VERSION,
        "model": model_source,
        "imagenet_dir": str(cfg.imagenet_dir.resolve()),
        "split": cfg.split,
        "labels": labels,
        "images_per_class": cfg.images_per_class,
        "n_items": n_items,
        "items_digest": items_digest,
        "layers": layers,
        "pool": cfg.pool,
        "prompt": cfg.prompt,
        "resize": cfg.resize,
        "dtype": cfg.dtype,
        "save_dtype": cfg.save_dtype,
        "shard_size": cfg.shard_size,
    }



def items_digest(root: Path, items: list[Any]) -> str:
    """Hash of every item's path, size and modification time (missing files count too)."""
    import hashlib

    h = hashlib.sha256()
    for item in items:
        try:
            st = (root / item.path).stat()
            h.update(f"{item.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{item.path}|missing\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


class _Images:
    """Map-style dataset of (item index, image or None); decoding failures are reported, not raised."""

    def __init__(self, root: Path, items: list[Any], indices: list[int], resize: int | None) -> None:
        self.root, self.items, self.indices, self.resize = root, items, indices, resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any, dict[str, Any]]:
        from lineofsight.data import SkipCounter, load_image

        skips = SkipCounter()
        idx = self.indices[i]
        image = load_image(self.root / self.items[idx].path, skips, self.resize)
        return idx, image, skips.to_dict()


class _Preprocess:
    """DataLoader ``collate_fn``: the processor runs where the images were decoded, so with
    ``--num-workers`` > 0 the workers tokenize and preprocess the next batches while the model runs."""

    def __init__(self, processor: Any, prompt: str) -> None:
        self.processor, self.prompt = processor, prompt

    def __call__(self, batch: list[tuple[int, Any, dict[str, Any]]]) -> tuple[list[int], Any, list[dict], int]:
        """(indices of the readable images, their processor inputs or None, skip counts, batch size)."""
        good = [(idx, image) for idx, image, _ in batch if image is not None]
        inputs = preprocess(self.processor, [image for _, image in good], self.prompt) if good else None
        return [idx for idx, _ in good], inputs, [skipped for _, _, skipped in batch], len(batch)


def preprocess(processor: Any, images: list[Any], prompt: str) -> Any:
    """Processor inputs (CPU tensors) for ``images``, each with ``prompt``."""
    from lineofsight.models import processor_inputs

    return processor_inputs(processor, [prompt] * len(images), images)


def pool_batch(
    resid_BTD: Any, input_ids_BT: Any, attention_mask_BT: Any, image_mask_BT: Any, pool: str
) -> Any:
    """Pool one layer's residual ``[B, T, D]`` to ``[B, D]`` (float32) over the chosen positions."""
    import torch

    resid = resid_BTD.float()
    if pool == "last":
        # Left padding puts every sequence's last token at the end.
        return resid[:, -1]
    mask = image_mask_BT if pool == "image" else attention_mask_BT.bool()
    weights = mask.to(resid.dtype)[..., None]
    counts = weights.sum(1).clamp_min(1)
    return torch.einsum("btd,btx->bd", resid, weights) / counts


def extract_batch(model: Any, processor: Any, images: list[Any], cfg: Config, sites: list[str]) -> Any:
    """``[B, n_layers, D]`` pooled activations for a batch of PIL images (one forward, early stop)."""
    return extract_inputs(model, preprocess(processor, images, cfg.prompt), cfg, sites)


def extract_inputs(model: Any, inputs: Any, cfg: Config, sites: list[str]) -> Any:
    """``[B, n_layers, D]`` pooled activations for preprocessed ``inputs`` (one forward, early stop)."""
    import torch

    from lineofsight.hooks import TraceDict
    from lineofsight.models import image_token_mask

    device = next(model.parameters()).device
    inputs = inputs.to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    image_mask = image_token_mask(inputs["input_ids"], model)
    with torch.no_grad(), TraceDict(model, sites, retain_input=True, retain_output=False, stop=True) as td:
        model(**inputs, use_cache=False)
    pooled = [
        pool_batch(td[site].input, inputs["input_ids"], inputs["attention_mask"], image_mask, cfg.pool)
        for site in sites
    ]
    return torch.stack(pooled, 1)


@lifecycle("probes/compute_image_activations.py", outputs=CACHE_OUTPUTS, resumable=True)
def main(cfg: Config, run: Run) -> Path:
    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cache import (
        open_cache,
        pending_shards,
        summarise_activation_shards,
        write_activation_shard,
        write_cache_metadata,
    )
    from lineofsight.cli import UserError
    from lineofsight.data import ClassIndex, SkipCounter, imagenet_items, select_classes
    from lineofsight.models import (
        check_layer,
        check_model,
        image_placeholder,
        image_prompt,
        n_layers,
        residual_site,
        text_config,
    )
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    info = run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.imagenet_dir)
    index = ClassIndex.read(cfg.imagenet_dir)
    labels = select_classes(index, cfg.classes)
    items = imagenet_items(cfg.imagenet_dir, cfg.split, labels, index, cfg.images_per_class)
    if not items:
        raise UserError(f"no images found in {cfg.imagenet_dir / cfg.split} for the selected classes")
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    placeholder = image_placeholder(processor)
    if cfg.prompt is None:
        cfg = dataclasses.replace(cfg, prompt=image_prompt(model, processor))
    elif cfg.prompt.count(placeholder) != 1:
        raise UserError(f"--prompt must contain the image placeholder {placeholder!r} once")
    processor.tokenizer.padding_side = "left"
    n = n_layers(model)
    layers = list(cfg.layers) or (list(PAPER_LAYERS) if n == 32 else list(range(n + 1)))
    for layer in layers:
        check_layer(model, layer, "--layers")
    layers = sorted(set(layers))
    sites = [residual_site(model, layer) for layer in layers]

    key = cache_key(cfg, model_source, labels, layers, len(items), items_digest(cfg.imagenet_dir, items))
    cache, complete = open_cache(run, cfg.out, key, cfg.overwrite, "acts", {"args": _jsonable(cfg)})
    if complete:
        run.finish(f"reusing the complete cache {cache}")
        return cache

    if cfg.num_workers > 0:  # the workers tokenize; the main process's tokenizer threads are not forked
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    mine, todo = pending_shards(cache, n_shards)
    if len(todo) < len(mine):
        dist.print0(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of rank 0 already done")
    save_dtype = getattr(torch, cfg.save_dtype)
    d_model = text_config(model).hidden_size
    progress = tqdm(total=sum(min(cfg.shard_size, len(items) - s * cfg.shard_size) for s in todo),
                    desc="images", unit="img", disable=not info.is_main)
    for shard in todo:
        lo, hi = shard * cfg.shard_size, min(len(items), (shard + 1) * cfg.shard_size)
        loader = torch.utils.data.DataLoader(
            _Images(cfg.imagenet_dir, items, list(range(lo, hi)), cfg.resize),
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_Preprocess(processor, cfg.prompt),
        )
        skips = SkipCounter()
        acts, kept = [], []
        for good, inputs, skipped, n_batch in loader:
            run.check_alive()
            for counts in skipped:
                skips.merge(counts)
            if good:
                acts.append(extract_inputs(model, inputs, cfg, sites).to(save_dtype).cpu())
                kept += good
            progress.update(n_batch)
        write_activation_shard(
            cache, shard, torch.cat(acts) if acts else torch.zeros(0, len(layers), d_model, dtype=save_dtype),
            torch.tensor([items[i].label for i in kept], dtype=torch.long), torch.tensor(kept, dtype=torch.long),
            [items[i].path for i in kept], skips.to_dict())
    progress.close()
    dist.barrier()

    summary = summarise_activation_shards(cache, n_shards)  # every rank reads the shard headers (cheap)
    if summary["n_images"] == 0:
        raise UserError(f"every image was unreadable ({summary['skipped_summary']}); nothing to cache")
    if info.is_main:
        write_cache_metadata(cache, {
            **summary,
            "layers": layers,
            "pool": cfg.pool,
            "prompt": cfg.prompt,
            "class_names": [index.names[label] for label in labels],
            "class_labels": labels,
            "key": key,
        })
    dist.barrier()
    run.finish(f"wrote {cache}: {summary['n_images']} images x {len(layers)} layers x {summary['d_model']} "
               f"in {time.perf_counter() - start:.1f}s; {summary['skipped_summary']}")
    return cache


def _jsonable(cfg: Config) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
