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
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineofsight.cli import UserError
from lineofsight.io import (
    FILE_MODE,
    atomic_file,
    check_shape,
    open_tensors,
    read_json,
    safetensors_dtype,
    tensors_metadata,
    torch_dtype_name,
)

if TYPE_CHECKING:
    from lineofsight.run import Run

__all__ = [
    "CACHE_OUTPUTS",
    "TOKEN_CACHE_VERSION",
    "cache_dir_for",
    "find_cache",
    "key_hash",
    "open_cache",
    "open_token_cache",
    "pending_shards",
    "read_activation_cache",
    "read_token_cache",
    "shard_path",
    "summarise_activation_shards",
    "summarise_token_shards",
    "write_activation_shard",
    "write_cache_metadata",
    "write_token_shard",
    "TokenRows",
    "TokenShardWriter",
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


def _shard_skips(f: Any, path: Path, what: str) -> dict[str, Any]:
    """The skip counts a cache shard keeps in its header metadata (``SkipCounter.to_dict()``)."""
    return check_shape(tensors_metadata(f, path, what, "skipped"), "object", f"{what} {path}: 'skipped'")


def summarise_activation_shards(cache: Path, n_shards: int) -> dict[str, Any]:
    """Image count, d_model, shard names and the summed skips, from the shards' headers (cheap)."""
    from lineofsight.data import SkipCounter

    skips = SkipCounter()
    n_images, d_model, shards = 0, None, []
    for shard in range(n_shards):
        path = shard_path(cache, shard)
        with open_tensors(path, _ACTS_SHARD) as f:
            skips.merge(_shard_skips(f, path, _ACTS_SHARD))
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
_HEADER_RESERVE = 64 * 1024
"""Bytes kept free for a token shard's safetensors header while its activations are streamed in behind it."""


class TokenShardWriter:
    """Writes shard ``shard`` of a token cache as its tokens arrive, so no more than one forward pass of
    tokens is ever held in memory (plus 25 bytes per token of the small fields).

    ``add(tokens)`` appends a :class:`lineofsight.harvest.TokenBatch`'s activations straight to the file
    (behind a reserved header); ``close(skipped)`` appends the small fields (``token_type``, ``sample``,
    ``token_id``, ``type_index``), writes the safetensors header (padded with spaces, which the format
    allows) and renames the temp file ``.shard-N.safetensors.*.tmp`` over the shard: like every shard,
    it exists only when complete. A header too large for the reservation (a huge skip report) is
    handled by copying the data behind a header of the right size (in 64 MiB chunks, off the heap).
    Use as a context manager (the temp file is removed when the block raises) or call ``abort()``.
    """

    def __init__(self, cache: Path, shard: int, n_layers: int, d_model: int, dtype: Any) -> None:
        import tempfile

        self.path = shard_path(cache, shard)
        self.n_layers, self.d_model, self.dtype = n_layers, d_model, dtype
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{self.path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "w+b")
        self.f.seek(8 + _HEADER_RESERVE)
        self.n_tokens = 0
        self.small: dict[str, list[Any]] = {"sample": [], "token_id": [], "type_index": [], "token_type": []}

    def add(self, tokens: Any) -> None:
        """Append the tokens of a :class:`lineofsight.harvest.TokenBatch` (``acts [n, n_layers, d_model]``)."""
        import torch

        acts = tokens.acts.detach()
        if acts.dim() != 3 or tuple(acts.shape[1:]) != (self.n_layers, self.d_model):
            raise ValueError(f"token shard: acts {list(acts.shape)}, expected [n, {self.n_layers}, {self.d_model}]")
        acts = acts.to(self.dtype).contiguous().cpu()
        if acts.numel():
            self.f.write(acts.reshape(-1).view(torch.uint8).numpy().data)
        self.n_tokens += acts.shape[0]
        for name, parts in self.small.items():
            parts.append(getattr(tokens, name).detach().cpu())

    def close(self, skipped: dict[str, Any]) -> Path:
        """Finish the shard (atomically) and return its path."""
        import shutil

        import torch

        try:
            fields = {"acts": (self.dtype, [self.n_tokens, self.n_layers, self.d_model])}
            small = {}
            for name, parts in self.small.items():
                dtype = torch.uint8 if name == "token_type" else torch.long
                small[name] = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
                fields[name] = (dtype, [self.n_tokens])
            # Data order: acts (streamed already), then the int64 fields, then token_type (uint8):
            # every tensor starts at a multiple of its element size.
            header: dict[str, Any] = {"__metadata__": {"skipped": json.dumps(skipped)}}
            offset = 0
            for name in ("acts", "sample", "token_id", "type_index", "token_type"):
                dtype, shape = fields[name]
                n_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                header[name] = {"dtype": safetensors_dtype(dtype), "shape": shape,
                                "data_offsets": [offset, offset + n_bytes]}
                offset += n_bytes
            for name in ("sample", "token_id", "type_index", "token_type"):
                if small[name].numel():
                    self.f.write(small[name].contiguous().numpy().data)
            text = json.dumps(header, separators=(",", ":")).encode()
            if len(text) <= _HEADER_RESERVE:
                self.f.seek(0)
                self.f.write(len(text + b" " * (_HEADER_RESERVE - len(text))).to_bytes(8, "little"))
                self.f.write(text + b" " * (_HEADER_RESERVE - len(text)))
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                os.replace(self.tmp, self.path)
            else:  # rare: rewrite behind a header of the right size
                text += b" " * (-len(text) % 8)
                self.f.flush()
                self.f.seek(8 + _HEADER_RESERVE)
                with atomic_file(self.path) as g:
                    g.write(len(text).to_bytes(8, "little") + text)
                    shutil.copyfileobj(self.f, g, 64 << 20)
                self.abort()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the unfinished shard (its temp file)."""
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            self.abort()


def write_token_shard(cache: Path, shard: int, tokens: Any, skipped: dict[str, Any]) -> Path:
    """Shard ``shard`` of a token cache, written atomically: the tensors of a
    :class:`lineofsight.harvest.TokenBatch` (``acts [n_tokens, n_layers, d_model]``, ``token_type``
    (0 image, 1 text_in_context, 2 text_only), ``sample`` (record index), ``token_id``,
    ``type_index``) and the skip counts (:meth:`lineofsight.data.SkipCounter.to_dict`) in the metadata.
    The tokens of one call; :class:`TokenShardWriter` writes a shard batch by batch."""
    _, n_layers, d_model = tokens.acts.shape
    with TokenShardWriter(cache, shard, n_layers, d_model, tokens.acts.dtype) as writer:
        writer.add(tokens)
        return writer.close(skipped)


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
            skips.merge(_shard_skips(f, path, _TOKEN_SHARD))
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


def _token_cache_meta(path: Path | str, layer: int | None, types: tuple[str, ...]
                      ) -> tuple[Path, Path, dict[str, Any], int, Any]:
    """(cache folder, metadata path, metadata, layer, type codes) of a complete token cache, checked."""
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
    codes = torch.tensor([TOKEN_TYPES.index(t) for t in types], dtype=torch.uint8)
    return cache, meta_path, meta, layer, codes


def _check_token_shard(shard: Path, shape: list[int], token_type: Any, n_layers: int) -> None:
    if len(shape) != 3 or shape[1] != n_layers or list(token_type.shape) != shape[:1]:
        raise UserError(f"{_TOKEN_SHARD} {shard}: 'acts' has shape {shape} and 'token_type' "
                        f"{list(token_type.shape)}; expected [tokens, {n_layers} layers, d_model] and [tokens]")


def read_token_cache(path: Path | str, layer: int | None, types: tuple[str, ...]
                     ) -> tuple[Any, Any, int, dict[str, Any]]:
    """The tokens of ``types`` at ``layer`` (default: the cache's first layer) of a complete token cache,
    all in memory (the reference :class:`TokenRows` is tested against; training reads through it instead).

    ``path`` is the cache folder or the ``--out`` given to sae/cache_activations.py. Returns
    ``(acts [N, d_model] float32, token_type [N] uint8, layer, metadata.json)``; a layer the cache
    does not hold, or no tokens of ``types``, is a :class:`UserError`.
    """
    import torch

    cache, meta_path, meta, layer, codes = _token_cache_meta(path, layer, types)
    col = meta["layers"].index(layer)
    acts, kinds, widths = [], [], set()
    for name in meta["shards"]:
        shard = _shard_file(cache, name, meta_path)
        with open_tensors(shard, _TOKEN_SHARD) as f:
            token_type = f.get_tensor("token_type")
            sliced = f.get_slice("acts")
            shape = sliced.get_shape()
            _check_token_shard(shard, shape, token_type, len(meta["layers"]))
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


class TokenRows:
    """The tokens of ``types`` at one or several layers of a token cache, read from the shard files row by row on demand.

    Row ``i`` is the i-th kept token in shard order (exactly :func:`read_token_cache`'s row ``i``).
    ``rows[idx]`` (``idx`` a LongTensor) reads just those rows in the cache's dtype: ``[len(idx), d_model]``
    when ``layer`` is one layer (or None: the cache's first), ``[len(idx), len(layer), d_model]`` when it is a
    list. A token's layers lie side by side in its shard, so each row takes one positioned read
    (``os.preadv``) per run of adjacent layers, straight into the result: nothing is mapped, so neither
    the heap nor the resident set grows with the cache (the OS page cache does the caching). In memory
    stay, per token, its type (1 byte) and, when ``types`` drops some tokens, the kept token's row within
    its shard (4 bytes); per shard, its path and where its activations start.
    """

    def __init__(self, path: Path | str, layer: int | None | Sequence[int], types: tuple[str, ...]) -> None:
        import torch

        several = isinstance(layer, Sequence)
        wanted = list(layer) if several else [layer]
        if several and not wanted:
            raise UserError("no layers requested from the token cache")
        checked = [_token_cache_meta(path, one, types) for one in wanted]
        cache, meta_path, meta, _, codes = checked[0]
        self.cache, self.meta = cache, meta
        self.layers = [c[3] for c in checked]
        """The layers read, in the order of a row's second axis."""
        self.layer = self.layers[0]
        self._several = several
        n_layers = len(meta["layers"])
        cols = [meta["layers"].index(one) for one in self.layers]
        # Runs of requested layers that are adjacent in the shard: (first position in the row, first column, count).
        self._runs: list[tuple[int, int, int]] = []
        for pos, col in enumerate(cols):
            if self._runs and self._runs[-1][1] + self._runs[-1][2] == col:
                first, start, n = self._runs[-1]
                self._runs[-1] = (first, start, n + 1)
            else:
                self._runs.append((pos, col, 1))
        self.paths: list[Path] = []
        self.kept: list[Any] = []  # per shard: int32 rows of the kept tokens, or None (all kept)
        self.base: list[int] = []  # per shard: the byte offset of row 0's activations
        kinds, starts, widths, dtypes = [], [0], set(), set()
        for name in meta["shards"]:
            shard = _shard_file(cache, name, meta_path)
            with open_tensors(shard, _TOKEN_SHARD) as f:
                token_type = f.get_tensor("token_type")
                shape = f.get_slice("acts").get_shape()
                _check_token_shard(shard, shape, token_type, n_layers)
                dtype = f.get_slice("acts").get_dtype()
            data_start, info = _safetensors_layout(shard)
            keep = torch.isin(token_type, codes)
            n_keep = int(keep.sum())
            self.kept.append(None if n_keep == len(keep) else keep.nonzero().flatten().to(torch.int32))
            kinds.append(token_type[keep])
            starts.append(starts[-1] + n_keep)
            widths.add(shape[2])
            dtypes.add(dtype)
            self.paths.append(shard)
            self.base.append(data_start + info["acts"]["data_offsets"][0])
        if len(widths) != 1:
            raise UserError(f"the shards of {cache} disagree on d_model: {sorted(widths)}")
        if len(dtypes) != 1:
            raise UserError(f"the shards of {cache} disagree on the activations' dtype: {sorted(dtypes)}")
        self.types = torch.cat(kinds)
        """``[N]`` uint8 type code of every row."""
        if len(self.types) == 0:
            raise UserError(f"--activations {cache} holds no tokens of types {', '.join(types)}")
        self.d_model = widths.pop()
        dtype = torch_dtype_name(dtypes.pop())
        if dtype is None or not getattr(torch, dtype).is_floating_point:
            raise UserError(f"the shards of {cache} hold activations of dtype {dtype}, not floating point")
        self.dtype = getattr(torch, dtype)
        self.row_bytes = self.d_model * torch.empty(0, dtype=self.dtype).element_size()
        """Bytes of one token at one layer."""
        self.stride = n_layers * self.row_bytes
        self.starts = torch.tensor(starts)

    def __len__(self) -> int:
        return len(self.types)

    def __getitem__(self, idx: Any) -> Any:
        import torch

        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        n_read = len(self.layers)
        out = torch.empty(len(idx), n_read, self.d_model, dtype=self.dtype)
        if len(idx):
            if int(idx.min()) < 0 or int(idx.max()) >= len(self):
                raise IndexError(f"token rows {int(idx.min())}..{int(idx.max())} out of range for {len(self)}")
            self._read(idx, out.view(torch.uint8).view(len(idx), n_read * self.row_bytes).numpy())
        return out if self._several else out[:, 0]

    def _read(self, idx: Any, buf: Any) -> None:
        """Rows ``idx`` into ``buf [len(idx), n_layers_read x row_bytes]`` (uint8, written in place)."""
        import torch

        shard_of = torch.searchsorted(self.starts, idx, right=True) - 1
        local = idx - self.starts[shard_of]
        rb = self.row_bytes
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().flatten()
            rows = local[where] if self.kept[s] is None else self.kept[s][local[where]].long()
            fd = os.open(self.paths[s], os.O_RDONLY)
            try:
                for j, offset in zip(where.tolist(), (self.base[s] + rows * self.stride).tolist(), strict=True):
                    for first, col, n in self._runs:
                        part = buf[j, first * rb : (first + n) * rb]
                        if os.preadv(fd, [part], offset + col * rb) != n * rb:
                            raise UserError(f"{_TOKEN_SHARD} {self.paths[s]} is truncated")
            finally:
                os.close(fd)


def open_token_cache(path: Path | str, layer: int | None | Sequence[int], types: tuple[str, ...]) -> TokenRows:
    """The tokens of ``types`` at ``layer`` (one layer, None for the cache's first, or a list) of a complete token
    cache, read lazily (:class:`TokenRows`); the same checks and errors as :func:`read_token_cache`."""
    return TokenRows(path, layer, types)


def _safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data of a safetensors file starts, its header); the file was opened by safetensors already."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))
