"""Atomic artifact writing and run provenance.

Every artifact is written to a temporary file in the target folder and renamed over the
target, so a killed run never leaves a half-written file under the final name. Tensors go
to safetensors, everything else to JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from lineofsight.cli import UserError

__all__ = ["FILE_MODE", "atomic_file", "atomic_write_bytes", "atomic_write_text", "check_shape", "json_type", "load_tensors", "open_tensors",
           "provenance", "read_json", "read_text", "save_figure", "safetensors_dtype", "save_tensors", "tensors_metadata",
           "torch_dtype_name", "write_json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` gives a new file under this process's umask (``mkstemp``'s own is 0600)."""


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Any]:
    """A binary file object for ``path``: a temp file ``.{name}.*.tmp`` in the same folder (the usual
    umask-respecting permissions), fsynced and renamed over ``path`` when the block exits cleanly,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace`` (the file gets
    the usual umask-respecting permissions)."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> Path:
    """Pretty JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# safetensors' dtype names, listed in the order of its ``Dtype`` enum (increasing alignment): the file
# holds tensors sorted by this rank descending, then by name, as ``safetensors.torch.save`` writes them.
_ST_DTYPES: list[tuple[str, str]] = [
    ("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("int16", "I16"), ("uint16", "U16"), ("float16", "F16"), ("bfloat16", "BF16"), ("int32", "I32"),
    ("uint32", "U32"), ("float32", "F32"), ("complex64", "C64"), ("float64", "F64"), ("int64", "I64"),
    ("uint64", "U64")]


def safetensors_dtype(dtype: Any) -> str:
    """safetensors' name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return dict(_ST_DTYPES)[str(dtype).removeprefix("torch.")]


def torch_dtype_name(safetensors_name: str) -> str | None:
    """The torch dtype name of a safetensors dtype name (``"BF16"`` -> ``"bfloat16"``), None if unknown."""
    return {st: name for name, st in _ST_DTYPES}.get(safetensors_name)


def _safetensors_header(tensors: Mapping[str, Any], meta: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The first 8 + N bytes of the safetensors file of ``tensors`` (little-endian u64 N, then the JSON
    header padded with spaces to a multiple of 8) and the order in which their data follows."""
    import torch

    rank = {getattr(torch, name): (i, st) for i, (name, st) in enumerate(_ST_DTYPES) if hasattr(torch, name)}
    for key, v in tensors.items():
        if not isinstance(key, str) or key == "__metadata__":
            raise TypeError(f"save_tensors: {key!r} cannot name a tensor (the header reserves '__metadata__')")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_tensors: {key!r} is a {type(v).__name__}, not a torch.Tensor")
        if v.layout != torch.strided:
            raise ValueError(f"save_tensors: {key!r} is a sparse tensor ({v.layout}); call .to_dense() first")
        if v.dtype not in rank:
            raise TypeError(f"save_tensors: {key!r} has dtype {v.dtype}, which safetensors cannot store here")
    order = sorted(tensors, key=lambda k: (-rank[tensors[k].dtype][0], k))
    header: dict[str, Any] = {}
    if meta:  # keys sorted: safetensors itself writes them in (random) hash order
        bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"save_tensors: metadata must map strings to strings ({bad[0]!r} does not)")
        header["__metadata__"] = dict(sorted(meta.items()))
    offset = 0
    for key in order:
        v = tensors[key]
        n_bytes = v.numel() * v.element_size()
        header[key] = {"dtype": rank[v.dtype][1], "shape": list(v.shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # serde_json's compact form
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def save_tensors(path: Path | str, tensors: Mapping[str, Any], meta: Mapping[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors, atomically, streaming one tensor at a time.

    The bytes equal ``safetensors.torch.save(tensors, meta)`` (metadata keys sorted), but nothing holds the
    whole file in memory: a contiguous CPU tensor is written from its own buffer, any other (non-contiguous,
    on an accelerator) is copied to a contiguous CPU tensor alone, written and dropped. So a checkpoint
    costs at most one tensor of extra host memory, not a second copy of the state.
    """
    import torch

    if sys.byteorder != "little":  # safetensors data is little-endian; so is every host we run on
        raise RuntimeError("save_tensors writes the host's bytes as they are; this host is big-endian")
    tensors = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    header, order = _safetensors_header(tensors, meta)
    with atomic_file(path) as f:
        f.write(header)
        for key in order:
            v = tensors[key]
            if v.numel() == 0:
                continue
            data = v.contiguous().cpu().resolve_conj().resolve_neg()  # v itself when it already is all that
            # A uint8 view of its buffer (reshape first: a 0-d tensor cannot change element size).
            # BufferedWriter passes a buffer this large straight to write(2), without copying it.
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)
            del data
    return Path(path)


def provenance() -> dict[str, Any]:
    """Git SHA (+ dirty flag) and library versions, stored next to results."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "numpy", "lineofsight"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_sha": sha or None, "git_dirty": dirty, "versions": versions}


def save_figure(fig: Any, path: Path | str) -> Path:
    """Render a matplotlib figure to PNG, write it atomically, and close the figure."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Reading artifacts: a missing, truncated or malformed file is a one-line UserError naming it.
# (The readers that match the writers above, write_json and save_tensors; every module that reads
# an artifact goes through them.)
# ---------------------------------------------------------------------------------------------

# JSON shapes that read_json can require: name -> (test, how the message says it).
_SHAPES: dict[str, tuple[Any, str]] = {
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[int]": (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                  "a list of integers"),
}


def json_type(value: Any) -> str:
    """How a message names the JSON type of ``value`` (``a list``, ``a string``, ``null``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind in ("object", "list", "str", "number"):
        if _SHAPES[kind][0](value):
            return _SHAPES[kind][1]
    return type(value).__name__


def check_shape(value: Any, shape: str, where: str) -> Any:
    """``value`` if it has the JSON ``shape`` (a key of ``_SHAPES``), else :class:`UserError` ``"{where} should be ..."``."""
    test, name = _SHAPES[shape]
    if not test(value):
        actual = json_type(value)
        if shape.startswith("list[") and isinstance(value, list):
            item = next(x for x in value if not _SHAPES[shape[5:-1]][0](x))
            actual = f"a list holding {json_type(item)} ({item!r:.40})"
        raise UserError(f"{where} should be {name}, not {actual}")
    return value


def read_text(path: Path | str, what: str) -> str:
    """The text of ``path`` (UTF-8, a leading BOM dropped); :class:`UserError` ``"{what} {path} ..."`` when
    it is missing, a folder, unreadable or not UTF-8 (naming the line of the first bad byte)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})") from None


def read_json(path: Path | str, what: str, shape: str = "object", required: Mapping[str, str] | None = None) -> Any:
    """The JSON value in ``path``, which must have ``shape`` (``object``, ``list``, ...; see ``_SHAPES``)
    and, for an object, hold every key of ``required`` with the shape given there.

    :class:`UserError` ``"{what} {path} ..."`` names the problem: missing, not UTF-8, not JSON
    (with line and column), the wrong shape, a missing key, a key of the wrong shape.
    """
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                        ) from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({err})") from None
    check_shape(value, shape, f"{what} {path}")
    for key, key_shape in (required or {}).items():
        if key not in value:
            raise UserError(f"{what} {path} has no {key!r} entry")
        check_shape(value[key], key_shape, f"{what} {path}: {key!r}")
    return value


def _tensor_problem(err: Exception) -> str:
    return str(err).strip().splitlines()[0].removeprefix("Error while deserializing header: ") if str(err) else (
        type(err).__name__)


@contextlib.contextmanager
def open_tensors(path: Path | str, what: str) -> Iterator[Any]:
    """``safetensors.safe_open(path)`` (torch tensors). A missing, empty, truncated or non-safetensors
    file, and a tensor asked of the handle that the file lacks, are :class:`UserError` naming ``path``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{what} {path} is truncated or not a safetensors file ({_tensor_problem(err)})") from None
    with handle as f:
        try:
            yield f
        except SafetensorError as err:
            raise UserError(f"{what} {path}: {_tensor_problem(err)}") from None


def tensors_metadata(f: Any, path: Path | str, what: str, key: str) -> Any:
    """The JSON value stored under ``key`` in the header metadata of an open safetensors file ``f``."""
    meta = f.metadata() or {}
    if key not in meta:
        raise UserError(f"{what} {path} has no {key!r} in its header metadata")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise UserError(f"{what} {path}: its header metadata {key!r} is not valid JSON") from None


def load_tensors(path: Path | str, what: str, keys: Iterable[str] = ()) -> dict[str, Any]:
    """Every tensor of a safetensors file on the CPU (what ``safetensors.torch.load_file`` gives), or a
    :class:`UserError` naming ``path`` when it is missing, truncated, not safetensors or lacks one of ``keys``."""
    with open_tensors(path, what) as f:
        names = list(f.keys())
        missing = [k for k in keys if k not in names]
        if missing:
            raise UserError(f"{what} {path} holds no tensor {', '.join(map(repr, missing))} "
                            f"(it holds {', '.join(names[:8]) or 'none'})")
        return {name: f.get_tensor(name) for name in names}
