"""Multiple-choice benchmarks in their Hugging Face schemas: MMMU-Pro, MMMU and A-OKVQA.

One reader for the three, from the hub id or a local copy (a ``save_to_disk`` folder, or parquet files as the
hub repositories lay them out), giving :class:`Item` s: the question, its options, the index of the right one,
the first image. What cannot be scored is counted by reason (:class:`lineofsight.data.SkipCounter`), never
silently dropped:

- ``MMMU/MMMU_Pro``, config ``standard (4 options)``, split ``test``: ``question``, ``options`` (the Python repr
  of a list of strings), ``image_1`` .. ``image_7``, ``answer`` (a letter), ``subject``.
- ``MMMU/MMMU``, one config per subject (:data:`MMMU_SUBJECTS`), split ``validation``: the same columns plus
  ``question_type``; open-ended items are counted (``open-ended``) and excluded, not scored as wrong.
- ``HuggingFaceM4/A-OKVQA``, split ``validation``: ``question``, ``choices`` (a list), ``correct_choice_idx``,
  ``image``.

Like the paper's evaluation, an item with several images is asked with its first (counted in
``n_multi_image``). The toy world writes its lettered task in the first and third schemas
(:func:`lineofsight.toy.generate_world`).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lineofsight.cli import UserError
from lineofsight.data import SkipCounter, check_resize, resize_image
from lineofsight.prompts import MC_LETTERS

__all__ = [
    "BENCHMARKS",
    "MMMU_SUBJECTS",
    "Benchmark",
    "Item",
    "read_items",
]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and which of its parts the paper scored."""

    name: str
    hub_id: str
    config: str | None
    """the hub config (MMMU: one per subject, see :data:`MMMU_SUBJECTS`)"""
    split: str
    image_columns: tuple[str, ...]


MMMU_IMAGES = tuple(f"image_{i}" for i in range(1, 8))
BENCHMARKS: dict[str, Benchmark] = {
    "mmmu-pro": Benchmark("mmmu-pro", "MMMU/MMMU_Pro", "standard (4 options)", "test", MMMU_IMAGES),
    "mmmu": Benchmark("mmmu", "MMMU/MMMU", None, "validation", MMMU_IMAGES),
    "aokvqa": Benchmark("aokvqa", "HuggingFaceM4/A-OKVQA", None, "validation", ("image",)),
}
MMMU_SUBJECTS: tuple[str, ...] = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)  # fmt: skip
"""MMMU's 30 subjects (its hub configs), 30 validation items each."""


@dataclasses.dataclass
class Item:
    """One scorable multiple-choice item."""

    id: str
    subject: str
    question: str
    options: list[str]
    answer: int
    """index of the right option"""
    source: Any
    """the first image: a PIL image, or the dataset's encoded ``{"bytes", "path"}`` (checked readable), decoded when
    :attr:`image` is read, so a benchmark's images are never all in memory at once"""
    resize: int | None = None
    """``--resize`` applied when an encoded image is decoded"""

    @property
    def letter(self) -> str:
        return MC_LETTERS[self.answer]

    @property
    def image(self) -> Any:
        """The first image as RGB (resized if asked)."""
        from PIL import Image

        if isinstance(self.source, Image.Image):
            return self.source
        return resize_image(_decode(self.source), self.resize)


def _parquet_files(root: Path, config: str | None, split: str) -> list[str]:
    """The parquet files of ``split`` under ``root`` (a file, or a folder laid out as on the hub: ``<config>/`` or
    ``data/`` holding ``<split>-*.parquet``; or any ``*.parquet`` whose name starts with the split)."""
    if root.is_file():
        return [str(root)]
    for base in ([root / config] if config else []) + [root / "data", root]:
        if base.is_dir():
            found = sorted(base.glob(f"{split}-*.parquet")) or sorted(base.glob(f"{split}*.parquet"))
            if found:
                return [str(p) for p in found]
    return []


def _open(source: str, config: str | None, split: str) -> Any:
    """A ``datasets.Dataset``: a ``save_to_disk`` folder (a DatasetDict or one Dataset), parquet files, or the hub."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.exists():
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise UserError(f"{source}: no split {split!r} (it has {', '.join(loaded)}); pass --split")
                    return loaded[split]
                return loaded
            files = _parquet_files(path, config, split)
            if not files:
                raise UserError(f"{source}: neither a save_to_disk folder nor parquet files of split {split!r}")
            return datasets.load_dataset("parquet", data_files={split: files}, split=split)
        return datasets.load_dataset(source, config, split=split)
    except UserError:
        raise
    except FileNotFoundError as err:
        raise UserError(f"{source}: not found ({str(err).splitlines()[0] if str(err) else 'no such dataset'})") from None
    except Exception as err:  # the hub offline, a dataset without this config, a corrupt arrow file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{source}{f' ({config})' if config else ''}: cannot load split {split!r}: {first}") from None


def _check_columns(ds: Any, needed: tuple[str, ...], source: str, name: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: not in the {name} schema: no column {', '.join(missing)} "
                        f"(it has {', '.join(ds.column_names)})")


def _options(value: Any) -> list[str] | None:
    """MMMU's options: the repr of a list of strings (or a list); None if it is not one."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        return None
    return [o.strip() for o in value]


def _decode(encoded: dict[str, Any]) -> Any:
    """An image column's ``{"bytes", "path"}`` as an RGB PIL image."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(encoded["bytes"]) if encoded.get("bytes") else encoded["path"]) as im:
        return im.convert("RGB")


def _first_image(row: dict[str, Any], columns: tuple[str, ...]) -> tuple[Any, int, str | None]:
    """(the first image, still encoded, how many images the item has, a skip reason or None). The image is decoded
    once here to check it is readable, then dropped: :attr:`Item.image` decodes it again when it is scored."""
    present = [c for c in columns if row.get(c) is not None]
    if not present:
        return None, 0, "no image"
    encoded = row[present[0]]
    try:
        _decode(encoded)
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a broken file: it is counted, not fatal
        return None, len(present), "unreadable image"
    return encoded, len(present), None


def read_items(name: str, source: str | None = None, split: str | None = None, config: str | None = None,
               subjects: tuple[str, ...] = (), limit: int | None = None, resize: int | None = None,
               skips: SkipCounter | None = None, counts: dict[str, int] | None = None) -> Iterator[Item]:
    """The scorable items of benchmark ``name`` (a key of :data:`BENCHMARKS`) from ``source`` (default: the hub id),
    in dataset order, at most ``limit`` of them. ``subjects`` restricts MMMU's (default: all 30; for a local MMMU
    copy, a folder per subject) and filters the others' ``subject`` column. What is skipped goes to ``skips`` by
    reason; ``counts`` gains ``n_rows``, ``n_multi_image`` and, for MMMU, ``n_open``."""
    check_resize(resize)
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r} (one of {', '.join(BENCHMARKS)})")
    bench = BENCHMARKS[name]
    source = source or bench.hub_id
    split = split or bench.split
    skips = skips if skips is not None else SkipCounter()
    counts = counts if counts is not None else {}
    for key in ("n_rows", "n_multi_image") + (("n_open",) if name == "mmmu" else ()):
        counts.setdefault(key, 0)
    n = 0
    for subject, ds in _tables(bench, source, split, config, subjects):
        ds = _undecoded(ds, bench.image_columns)
        for row in ds:
            if limit is not None and n >= limit:
                return
            counts["n_rows"] += 1
            item = _item(bench, row, subject, resize, skips, counts)
            if item is not None:
                n += 1
                yield item


def _undecoded(ds: Any, columns: tuple[str, ...]) -> Any:
    """``ds`` with its image columns left as bytes: a row then never decodes images it does not use (MMMU's
    image_2..7), and a broken image is counted by :func:`_first_image` instead of failing the whole read."""
    import datasets

    for c in columns:
        if c in ds.column_names and isinstance(ds.features[c], datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


def _tables(bench: Benchmark, source: str, split: str, config: str | None, subjects: tuple[str, ...]
            ) -> Iterator[tuple[str | None, Any]]:
    """(subject or None, dataset) in order: MMMU one per subject, the others one (filtered by ``subjects``)."""
    if bench.name == "mmmu":
        unknown = [s for s in subjects if s not in MMMU_SUBJECTS]
        if unknown:
            raise UserError(f"--subjects: not an MMMU subject: {', '.join(unknown)}")
        local = Path(source).expanduser()
        for subject in subjects or MMMU_SUBJECTS:
            if local.exists():
                if not (local / subject).exists():
                    if subjects:
                        raise UserError(f"{source}: no folder {subject}/ for MMMU subject {subject}")
                    continue  # a local copy of some subjects only: the others are reported as absent below
                ds = _open(str(local / subject), None, split)
            else:
                ds = _open(source, subject, split)
            _check_columns(ds, ("question", "options", "answer", "question_type", "image_1"), source, "MMMU")
            yield subject, ds
        return
    ds = _open(source, config if config is not None else bench.config, split)
    if bench.name == "aokvqa":
        _check_columns(ds, ("question", "choices", "correct_choice_idx", "image"), source, "A-OKVQA")
    else:
        _check_columns(ds, ("question", "options", "answer", "image_1"), source, "MMMU-Pro")
    if subjects:
        if "subject" not in ds.column_names:
            raise UserError(f"--subjects: {source} has no subject column")
        wanted = set(subjects)
        ds = ds.filter(lambda s: s in wanted, input_columns="subject")
    yield None, ds


def _item(bench: Benchmark, row: dict[str, Any], subject: str | None, resize: int | None, skips: SkipCounter,
          counts: dict[str, int]) -> Item | None:
    item_id = str(row.get("id", row.get("question_id", counts["n_rows"] - 1)))
    if bench.name == "mmmu" and str(row.get("question_type", "")).strip().lower() == "open":
        counts["n_open"] += 1
        return None
    if bench.name == "aokvqa":
        options = _options(row["choices"])
        answer = row["correct_choice_idx"]
        answer = answer if isinstance(answer, int) and not isinstance(answer, bool) else None
    else:
        options = _options(row["options"])
        letter = str(row["answer"]).strip()
        answer = MC_LETTERS.index(letter) if len(letter) == 1 and letter in MC_LETTERS else None
    if options is None or not 2 <= len(options) <= len(MC_LETTERS):
        skips.add("bad options", item_id)
        return None
    if answer is None or not 0 <= answer < len(options):
        skips.add("bad answer", item_id)
        return None
    question = str(row["question"] or "").strip()
    if not question:
        skips.add("no question", item_id)
        return None
    image, n_images, reason = _first_image(row, bench.image_columns)
    if reason is not None:
        skips.add(reason, item_id)
        return None
    counts["n_multi_image"] += n_images > 1
    subject = subject or str(row.get("subject") or _subject_of(item_id) or bench.name)
    return Item(item_id, subject, question, options, answer, image, resize)


def _subject_of(item_id: str) -> str | None:
    """MMMU ids read ``validation_Art_Theory_12``: the subject is between the split and the number."""
    m = re.fullmatch(r"(?:dev|validation|test)_(.+)_\d+", item_id)
    return m.group(1) if m else None
