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
from typing import TYPE_CHECKING, Any

from lineofsight.cli import UserError
from lineofsight.io import check_shape, open_tensors, read_json, tensors_metadata

if TYPE_CHECKING:
    from lineofsight.run import Run

__all__ = [
    "CACHE_OUTPUTS",
    "TOKEN_CACHE_VERSION",
    "cache_dir_for",
    "find_cache",
    "key_hash",
    "open_cache",
    "pending_shards",
    "read_activation_cache",
    "read_token_cache",
    "shard_path",
    "summarise_activation_shards",
    "summarise_token_shards",
    "write_activation_shard",
    "write_cache_metadata",
    "write_token_shard",
]


def _shard_file(cache: Path, name: str, meta_path: Path) -> Path:
    """A shard named in ``metadata.json``: a plain file name inside the cache folder."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise UserError(f"cache metadata {meta_path} lists a shard {name!r} that is not a file name in the cache")
    return cache / name


def key_hash(key: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``key`` as canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


CACHE_OUTPUTS = ("config.json", "metadata.json", "shard-*.safetensors")
"""What a cache folder holds (the patterns ``--overwrite`` removes; see :mod:`lineofsight.run`)."""


def cache_dir_for(out: Path, key: dict[str, Any], prefix: str) -> Path:
    """``out`` itself when it is a cache folder of this config, else ``out/<prefix>-<hash>``.

    An ``out`` that is a cache of a *different* config is refused (:class:`UserError`): pass its
    parent folder, where each config gets its own cache folder.
    """
    digest = key_hash(key)
    own = out / "config.json"
    if own.is_file():
        try:
            theirs = json.loads(own.read_text(encoding="utf-8")).get("key", {})
        except (ValueError, UnicodeDecodeError, AttributeError):
            theirs = None
        if not isinstance(theirs, dict) or not theirs:
            raise UserError(f"--out {out} holds a config.json that is not an activation cache's; "
                            "choose another --out")
        if key_hash(theirs) != digest:
            changed = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
            raise UserError(
                f"--out {out} holds a cache of a different config (differs in: {', '.join(changed)}); "
                "pass its parent folder or another --out"
            )
        return out
    return out / f"{prefix}-{digest}"


def open_cache(run: Run, out: Path, key: dict[str, Any], overwrite: bool, prefix: str,
               extra_config: dict[str, Any] | None = None) -> tuple[Path, bool]:
    """The cache folder of ``key`` under ``out``, ready for shards, and whether it is already complete.

    A complete cache is reused as it is (nothing is written). Otherwise ``run`` takes the folder
    (:meth:`lineofsight.run.Run.open`): a cache folder is addressed by its config, so an
    interrupted one of the same config is resumed, and ``overwrite`` starts it again (only a
    cache this script wrote). Rank 0 then writes ``config.json`` (the key, plus ``extra_config``);
    every rank returns after a barrier. Works in one process too.
    """
    from lineofsight import dist
    from lineofsight.io import write_json

    cache = cache_dir_for(out, key, prefix=prefix)
    if (cache / "metadata.json").is_file() and not overwrite:
        return cache, True
    run.open(cache, overwrite=overwrite, resume=not overwrite)
    if dist.is_main() and not (cache / "config.json").is_file():
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


# ---------------------------------------------------------------------------------------------
# Pooled-activation cache (probes/compute_image_activations.py): one row per image
# ---------------------------------------------------------------------------------------------


def write_activation_shard(cache: Path, shard: int, acts_NLD: Any, labels_N: Any, item_index_N: Any,
                           paths: list[str], skipped: dict[str, Any]) -> Path:
    """Shard ``shard`` of a pooled-activation cache: ``acts [n_images, n_layers, d_model]``, ``labels``,
    ``item_index``, and the image paths and skip counts in the safetensors metadata (atomic)."""
    from lineofsight.io import save_tensors

    return save_tensors(shard_path(cache, shard), {"acts": acts_NLD, "labels": labels_N, "item_index": item_index_N},
                        {"paths": json.dumps(paths), "skipped": json.dumps(skipped)})


def summarise_activation_shards(cache: Path, n_shards: int) -> dict[str, Any]:
    """Image count, d_model, shard names and the summed skips, from the shards' headers (cheap)."""
    from lineofsight.data import SkipCounter

    skips = SkipCounter()
    n_images, d_model, shards = 0, None, []
    for shard in range(n_shards):
        path = shard_path(cache, shard)
        with open_tensors(path, _ACTS_SHARD) as f:
            skips.merge(check_shape(tensors_metadata(f, path, _ACTS_SHARD, "skipped"), "object",
                                    f"{_ACTS_SHARD} {path}: 'skipped'"))
            shape = f.get_slice("acts").get_shape()
        if len(shape) != 3:
            raise UserError(f"{_ACTS_SHARD} {path}: 'acts' has shape {shape}, expected [images, layers, d_model]")
        n_images += shape[0]
        d_model = shape[2]
        shards.append(path.name)
    return {"n_images": n_images, "d_model": d_model, "shards": shards, "skipped": skips.to_dict(),
            "skipped_summary": skips.summary()}


def write_cache_metadata(cache: Path, metadata: dict[str, Any]) -> Path:
    """``metadata.json``, written last: it marks the cache complete."""
    from lineofsight.io import write_json

    return write_json(cache / "metadata.json", metadata)


def read_activation_cache(cache: Path | str) -> dict[str, Any]:
    """Load a complete pooled-activation cache (probes/compute_image_activations.py).

    Returns ``acts`` [N, n_layers, D] float32, ``labels`` [N] (class-index labels), ``paths``
    (image paths relative to the ImageNet root) and ``meta`` (``metadata.json``).

    Every file is checked: a ``metadata.json`` that is not JSON or lacks what the readers use, or a
    shard that is missing, truncated or of the wrong shape, is a :class:`UserError` naming the file.
    """
    import torch

    cache = find_cache(cache, "acts")
    meta_path = cache / "metadata.json"
    meta = read_json(meta_path, "activation-cache metadata", required=_ACTS_META)
    if len(meta["class_names"]) != len(meta["class_labels"]):
        raise UserError(f"activation-cache metadata {meta_path}: 'class_names' and 'class_labels' differ in length")
    if not meta["shards"]:
        raise UserError(f"activation-cache metadata {meta_path} lists no shards")
    n_layers = len(meta["layers"])
    acts, labels, paths = [], [], []
    for name in meta["shards"]:
        path = _shard_file(cache, name, meta_path)
        with open_tensors(path, _ACTS_SHARD) as f:
            acts_NLD, labels_N = f.get_tensor("acts"), f.get_tensor("labels")
            shard_paths = check_shape(tensors_metadata(f, path, _ACTS_SHARD, "paths"), "list[str]",
                                      f"{_ACTS_SHARD} {path}: 'paths'")
        n = acts_NLD.shape[0] if acts_NLD.dim() == 3 else -1
        if acts_NLD.dim() != 3 or acts_NLD.shape[1] != n_layers:
            raise UserError(f"{_ACTS_SHARD} {path}: 'acts' has shape {list(acts_NLD.shape)}, expected "
                            f"[images, {n_layers} layers, d_model] (metadata.json lists layers {meta['layers']})")
        if list(labels_N.shape) != [n] or len(shard_paths) != n:
            raise UserError(f"{_ACTS_SHARD} {path}: {n} activation rows but {labels_N.shape[0] if labels_N.dim() else 0} "
                            f"labels and {len(shard_paths)} paths")
        acts.append(acts_NLD.float())
        labels.append(labels_N)
        paths += shard_paths
    widths = {a.shape[2] for a in acts}
    if len(widths) != 1:
        raise UserError(f"the shards of {cache} disagree on d_model: {sorted(widths)}")
    labels_N = torch.cat(labels)
    unknown = sorted(set(labels_N.unique().tolist()) - set(meta["class_labels"]))
    if unknown:
        raise UserError(f"the shards of {cache} hold labels {unknown[:5]} that metadata.json's 'class_labels' "
                        "do not list")
    return {"acts": torch.cat(acts), "labels": labels_N, "paths": paths, "meta": meta}


_ACTS_SHARD = "activation-cache shard"
_ACTS_META = {"shards": "list[str]", "layers": "list[int]", "class_names": "list[str]", "class_labels": "list[int]"}


# ---------------------------------------------------------------------------------------------
# Token cache (sae/cache_activations.py writes it, sae/sae-trainer.py reads it): one row per token
# ---------------------------------------------------------------------------------------------

TOKEN_CACHE_VERSION = 1
"""Part of every token cache's key: a new shard layout gets a new version (and so a new folder)."""


_TOKEN_SHARD = "token-cache shard"


def write_token_shard(cache: Path, shard: int, tokens: Any, skipped: dict[str, Any]) -> Path:
    """Shard ``shard`` of a token cache, written atomically: the tensors of a
    :class:`lineofsight.harvest.TokenBatch` (``acts [n_tokens, n_layers, d_model]``, ``token_type``
    (0 image, 1 text_in_context, 2 text_only), ``sample`` (record index), ``token_id``,
    ``type_index``) and the skip counts (:meth:`lineofsight.data.SkipCounter.to_dict`) in the metadata."""
    from lineofsight.io import save_tensors

    return save_tensors(shard_path(cache, shard), tokens.to_dict(), {"skipped": json.dumps(skipped)})


def summarise_token_shards(cache: Path, n_shards: int) -> dict[str, Any]:
    """d_model, token counts (overall and by type), shard names and the summed skips of the shards:
    the part of a token cache's ``metadata.json`` that the shards determine."""
    import torch

    from lineofsight.data import SkipCounter
    from lineofsight.harvest import TOKEN_TYPES

    skips = SkipCounter()
    counts = torch.zeros(len(TOKEN_TYPES), dtype=torch.long)
    d_model, shards = None, []
    for shard in range(n_shards):
        path = shard_path(cache, shard)
        with open_tensors(path, _TOKEN_SHARD) as f:
            skips.merge(check_shape(tensors_metadata(f, path, _TOKEN_SHARD, "skipped"), "object",
                                    f"{_TOKEN_SHARD} {path}: 'skipped'"))
            token_type = f.get_tensor("token_type").long()
            shape = f.get_slice("acts").get_shape()
        bad_codes = token_type.numel() > 0 and int(token_type.max()) >= len(TOKEN_TYPES)
        if len(shape) != 3 or list(token_type.shape) != shape[:1] or bad_codes:
            raise UserError(f"{_TOKEN_SHARD} {path}: 'acts' {shape} and 'token_type' {list(token_type.shape)} do not "
                            "form a token shard")
        counts += torch.bincount(token_type, minlength=len(TOKEN_TYPES))
        d_model = shape[2]
        shards.append(path.name)
    return {"d_model": d_model, "token_types": list(TOKEN_TYPES), "n_tokens": int(counts.sum()),
            "n_tokens_by_type": dict(zip(TOKEN_TYPES, counts.tolist(), strict=True)), "shards": shards,
            "skipped": skips.to_dict(), "skipped_summary": skips.summary()}


def read_token_cache(path: Path | str, layer: int | None, types: tuple[str, ...]
                     ) -> tuple[Any, Any, int, dict[str, Any]]:
    """The tokens of ``types`` at ``layer`` (default: the cache's first layer) of a complete token cache.

    ``path`` is the cache folder or the ``--out`` given to sae/cache_activations.py. Returns
    ``(acts [N, d_model] float32, token_type [N] uint8, layer, metadata.json)``; a layer the cache
    does not hold, or no tokens of ``types``, is a :class:`UserError`.
    """
    import torch

    from lineofsight.harvest import TOKEN_TYPES

    bad = sorted(set(types) - set(TOKEN_TYPES))
    if bad:
        raise UserError(f"unknown token type(s) {', '.join(bad)}; valid: {', '.join(TOKEN_TYPES)}")
    cache = find_cache(path, "tokens")
    meta_path = cache / "metadata.json"
    meta = read_json(meta_path, "token-cache metadata", required={"shards": "list[str]", "layers": "list[int]",
                                                                    "key": "object"})
    if not meta["layers"] or not meta["shards"]:
        raise UserError(f"token-cache metadata {meta_path} lists no {'layers' if not meta['layers'] else 'shards'}")
    layer = meta["layers"][0] if layer is None else layer
    if layer not in meta["layers"]:
        raise UserError(f"--activations {cache} holds layers {meta['layers']}, not --layer {layer}")
    col = meta["layers"].index(layer)
    codes = torch.tensor([TOKEN_TYPES.index(t) for t in types], dtype=torch.uint8)
    acts, kinds, widths = [], [], set()
    for name in meta["shards"]:
        shard = _shard_file(cache, name, meta_path)
        with open_tensors(shard, _TOKEN_SHARD) as f:
            token_type = f.get_tensor("token_type")
            sliced = f.get_slice("acts")
            shape = sliced.get_shape()
            if len(shape) != 3 or shape[1] != len(meta["layers"]) or list(token_type.shape) != shape[:1]:
                raise UserError(f"{_TOKEN_SHARD} {shard}: 'acts' has shape {shape} and 'token_type' "
                                f"{list(token_type.shape)}; expected [tokens, {len(meta['layers'])} layers, d_model] "
                                "and [tokens]")
            keep = torch.isin(token_type, codes)
            acts.append(sliced[:, col : col + 1, :][keep, 0].float())
            kinds.append(token_type[keep])
            widths.add(shape[2])
    if len(widths) != 1:
        raise UserError(f"the shards of {cache} disagree on d_model: {sorted(widths)}")
    acts_ND, types_N = torch.cat(acts), torch.cat(kinds)
    if len(types_N) == 0:
        raise UserError(f"--activations {cache} holds no tokens of types {', '.join(types)}")
    return acts_ND, types_N, layer, meta
