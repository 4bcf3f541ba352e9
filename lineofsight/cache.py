"""Activation caches addressed by their config.

A cache is a folder ``<out>/<prefix>-<hash>``, the hash taken over everything that determines
its contents, holding ``config.json`` (written first), numbered safetensors shards (each written
atomically, so a shard file exists only when complete: the unit of resumption) and
``metadata.json`` (written last: the cache is complete). The same config finds the same folder
and reuses or resumes it; a folder of a different config is never written into.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lineofsight.cli import UserError

__all__ = ["cache_dir_for", "find_cache", "key_hash", "open_cache", "pending_shards", "read_activation_cache",
           "shard_path"]


def key_hash(key: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``key`` as canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir_for(out: Path, key: dict[str, Any], overwrite: bool, prefix: str) -> Path:
    """``out`` itself when it is a cache folder of this config, else ``out/<prefix>-<hash>``.

    An ``out`` that is a cache of a *different* config is refused (:class:`UserError`) unless
    ``overwrite`` is set.
    """
    digest = key_hash(key)
    own = out / "config.json"
    if own.is_file():
        theirs = json.loads(own.read_text()).get("key", {})
        if key_hash(theirs) != digest and not overwrite:
            changed = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            raise UserError(
                f"--out {out} holds a cache of a different config (differs in: {', '.join(changed)}); "
                "pass its parent folder or another --out"
            )
        return out
    return out / f"{prefix}-{digest}"


def open_cache(out: Path, key: dict[str, Any], overwrite: bool, prefix: str,
               extra_config: dict[str, Any] | None = None) -> tuple[Path, bool]:
    """The cache folder of ``key`` under ``out``, ready for shards, and whether it is already complete.

    Rank 0 deletes it first with ``overwrite`` and writes ``config.json`` (the key, plus
    ``extra_config``) into a new one; every rank returns after a barrier. Works in one process too.
    """
    import shutil

    from lineofsight import dist
    from lineofsight.io import write_json

    cache = cache_dir_for(out, key, overwrite, prefix=prefix)
    if overwrite and dist.is_main() and cache.exists():
        shutil.rmtree(cache)
    dist.barrier()
    if (cache / "metadata.json").is_file():
        return cache, True
    if dist.is_main():
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "config.json").is_file():
            write_json(cache / "config.json", {"key": key, **(extra_config or {})})
    dist.barrier()
    return cache, False


def pending_shards(cache: Path, n_shards: int) -> tuple[list[int], list[int]]:
    """This rank's shards (``shard % world_size == rank``) and those of them not written yet."""
    from lineofsight import dist

    mine = [s for s in range(n_shards) if s % dist.world_size() == dist.rank()]
    return mine, [s for s in mine if not shard_path(cache, s).is_file()]


def shard_path(cache: Path, shard: int) -> Path:
    return cache / f"shard-{shard:05d}.safetensors"


def find_cache(path: Path | str, prefix: str) -> Path:
    """``path`` if it is a complete cache, else its only complete ``<prefix>-*`` subfolder.

    Lets a script take the same ``--out`` its producer was given. Several complete caches
    under ``path`` are ambiguous: :class:`UserError` lists them.
    """
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path} does not exist")
    found = sorted(p for p in path.glob(f"{prefix}-*") if (p / "metadata.json").is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{path} holds no complete cache (no metadata.json in it or in a {prefix}-* subfolder)")
    raise UserError(f"{path} holds {len(found)} caches; pass one of: {', '.join(str(p) for p in found)}")


def read_activation_cache(cache: Path | str) -> dict[str, Any]:
    """Load a complete pooled-activation cache (probes/compute_image_activations.py).

    Returns ``acts`` [N, n_layers, D] float32, ``labels`` [N] (class-index labels), ``paths``
    (image paths relative to the ImageNet root) and ``meta`` (``metadata.json``).
    """
    import torch
    from safetensors import safe_open

    cache = find_cache(cache, "acts")
    meta = json.loads((cache / "metadata.json").read_text())
    acts, labels, paths = [], [], []
    for name in meta["shards"]:
        with safe_open(str(cache / name), framework="pt") as f:
            acts.append(f.get_tensor("acts").float())
            labels.append(f.get_tensor("labels"))
            paths += json.loads(f.metadata()["paths"])
    return {"acts": torch.cat(acts), "labels": torch.cat(labels), "paths": paths, "meta": meta}
