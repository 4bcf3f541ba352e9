"""Datasets in the layouts the real data uses: an ImageNet folder and ShareGPT4V JSON.

ImageNet layout: ``<root>/imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``)
and ``<root>/<split>/<wnid>/<image files>``. Class names are matched case-insensitively, with
``_`` and spaces interchangeable. Image problems (a file that is missing or does not decode)
are never fatal and never silent: :class:`SkipCounter` counts them by reason and the scripts
report the counts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lineofsight.cli import UserError
from lineofsight.models import Dtype

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassIndex",
    "CaptionRecord",
    "ImageItem",
    "SkipCounter",
    "imagenet_items",
    "load_image",
    "pair_key",
    "parse_pair",
    "read_class_pairs",
    "read_sharegpt4v",
    "select_classes",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class ClassIndex:
    """ImageNet's class index: label ``i`` has WordNet id ``wnids[i]`` and name ``names[i]``."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def read(cls, root: Path | str) -> ClassIndex:
        """Read ``<root>/imagenet_class_index.json``; :class:`UserError` when it is missing or malformed."""
        path = Path(root) / "imagenet_class_index.json"
        if not Path(root).is_dir():
            raise UserError(f"--imagenet-dir {root} does not exist or is not a directory")
        if not path.is_file():
            raise UserError(
                f"--imagenet-dir {root} has no imagenet_class_index.json (expected "
                '{"0": ["n01440764", "tench"], ...} next to the split folders)'
            )
        try:
            raw = json.loads(path.read_text())
            keys = sorted(raw, key=int)
            wnids = tuple(str(raw[k][0]) for k in keys)
            names = tuple(str(raw[k][1]) for k in keys)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise UserError(f"{path} is not a class index of the form {{\"0\": [wnid, name]}}: {err}") from None
        if [int(k) for k in keys] != list(range(len(keys))):
            raise UserError(f"{path}: labels must be 0..{len(keys) - 1}")
        return cls(wnids=wnids, names=names)

    def label(self, name: str) -> int:
        """Label of class ``name``; :class:`UserError` naming close matches when unknown."""
        wanted = _norm(name)
        normed = [_norm(n) for n in self.names]
        if wanted in normed:
            return normed.index(wanted)
        if name in self.wnids:
            return self.wnids.index(name)
        close = difflib.get_close_matches(wanted, normed, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(self.names[normed.index(c)] for c in close)}?" if close else ""
        raise UserError(f"class {name!r} is not in the class index ({len(self.names)} classes){hint}")


def select_classes(index: ClassIndex, spec: str) -> list[int]:
    """Labels chosen by ``spec``: ``all``, a count ``N`` (the first N), or a file of names (one per line)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(len(index.names)))
    if spec.isdigit():
        n = int(spec)
        if not 0 < n <= len(index.names):
            raise UserError(f"--classes {n}: the index has {len(index.names)} classes")
        return list(range(n))
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--classes {spec!r}: expected 'all', a number, or a file of class names (no such file)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise UserError(f"--classes {spec}: the file lists no class names")
    labels = [index.label(name) for name in names]
    return list(dict.fromkeys(labels))


def pair_key(src: str, tgt: str) -> str:
    """The ``src@tgt`` spelling of a class pair (pairs files, steering-vector keys, rollouts)."""
    return f"{src}@{tgt}"


def parse_pair(text: str) -> tuple[str, str] | None:
    """``"src@tgt"`` -> ``(src, tgt)``; None when it is not of that form."""
    src, sep, tgt = text.strip().partition("@")
    if not sep or not src.strip() or not tgt.strip() or "@" in tgt:
        return None
    return src.strip(), tgt.strip()


def read_class_pairs(path: Path | str, index: ClassIndex | None = None) -> list[tuple[str, str]]:
    """``src@tgt`` lines -> ``[(src, tgt)]``; names are checked against ``index`` when given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs file {path} does not exist")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pair = parse_pair(line)
        if pair is None:
            raise UserError(f"{path}:{n}: expected 'src@tgt', got {line!r}")
        if index is not None:
            index.label(pair[0]), index.label(pair[1])
        pairs.append(pair)
    if not pairs:
        raise UserError(f"pairs file {path} lists no pairs")
    return pairs


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One image of the dataset: its path (relative to the ImageNet root) and label."""

    path: str
    label: int


def imagenet_items(
    root: Path | str, split: str, labels: Sequence[int], index: ClassIndex, per_class: int | None = None
) -> list[ImageItem]:
    """Sorted image files of ``split`` for ``labels`` (at most ``per_class`` each), in label order.

    A class folder that is missing raises :class:`UserError` naming it; files with other
    extensions are ignored.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserError(f"no split {split!r} in {root} (found: {', '.join(found) or 'nothing'})")
    items = []
    for label in labels:
        class_dir = split_dir / index.wnids[label]
        if not class_dir.is_dir():
            raise UserError(f"class folder {class_dir} ({index.names[label]}) does not exist")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [ImageItem(str(p.relative_to(root)), label) for p in files[:per_class]]
    return items


class SkipCounter:
    """Counts skipped inputs by reason, keeping a few examples for the report."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(what)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: dict[str, Any]) -> None:
        for reason, n in other.get("counts", {}).items():
            self.counts[reason] += n
        for reason, ex in other.get("examples", {}).items():
            self.examples.setdefault(reason, [])
            self.examples[reason] = (self.examples[reason] + ex)[:3]

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "skipped nothing"
        parts = [f"{n} {reason} (e.g. {self.examples[reason][0]})" for reason, n in sorted(self.counts.items())]
        return f"skipped {self.total}: " + "; ".join(parts)


def load_image(path: Path | str, skips: SkipCounter | None = None, resize: int | None = None) -> Image.Image | None:
    """RGB image at ``path`` (optionally resized to ``resize`` x ``resize``), or None, counted in ``skips``."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        if skips is not None:
            skips.add("missing", str(path))
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        if skips is not None:
            skips.add("corrupt", str(path))
        return None
    if resize:
        image = image.resize((resize, resize), Image.Resampling.BICUBIC)
    return image


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """One ShareGPT4V record: an image and its first human question / gpt answer."""

    id: str
    image: str
    question: str
    caption: str


def read_sharegpt4v(path: Path | str, limit: int | None = None) -> list[CaptionRecord]:
    """Records of a ShareGPT4V-format JSON list (``{"id", "image", "conversations": [...]}``).

    The question is the first human turn without its ``<image>`` tag; the caption the first gpt
    turn. Records without an image or a gpt turn are left out. :class:`UserError` when the file
    is missing or not such a list.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"--data {path} is not JSON: {err}") from None
    if not isinstance(raw, list):
        raise UserError(f"--data {path}: expected a JSON list of ShareGPT4V records")
    records = []
    for rec in raw:
        turns = rec.get("conversations", []) if isinstance(rec, dict) else []
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if not rec.get("image") or human is None or gpt is None:
            continue
        question = human.replace("<image>", "").strip()
        records.append(CaptionRecord(str(rec.get("id", len(records))), rec["image"], question, gpt.strip()))
        if limit is not None and len(records) >= limit:
            break
    return records


def _toy_captions() -> Path:
    from lineofsight.paths import TOY_WORLD_DIR

    return TOY_WORLD_DIR / "sharegpt4v.json"


@dataclasses.dataclass
class HeldOutRecords:
    """Options shared by the scripts that read a model over held-out captioned images."""

    model: str = "toy"
    """The model (the SAEs' model): 'toy', an HF id or a local directory."""
    data: Path = dataclasses.field(default_factory=_toy_captions)
    """ShareGPT4V-format JSON list of records (use records the SAE did not train on)."""
    image_root: Path | None = None
    """Folder the records' image paths are relative to (default: the JSON file's folder)."""
    offset: int = 0
    """Skip the first N records (e.g. the ones the SAE was trained on with --limit)."""
    limit: int | None = 64
    """Use at most N records."""
    batch_size: int = 8
    """Records per forward pass."""
    max_caption_tokens: int = 128
    """Caption tokens kept per pass."""
    dtype: Dtype = "float32"
    """Model dtype."""
    device: str | None = None
    """Device: cpu, cuda or cuda:N (default: GPU if there is one, else cpu)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_caption_tokens < 1:
            raise UserError("--batch-size and --max-caption-tokens must be positive")
        if self.offset < 0 or (self.limit is not None and self.limit < 1):
            raise UserError("--offset must be >= 0 and --limit positive")

    def read_records(self) -> list[CaptionRecord]:
        """The records ``[offset : offset + limit]`` of ``--data``; :class:`UserError` when none are left."""
        records = read_sharegpt4v(self.data)[self.offset :]
        records = records[: self.limit] if self.limit is not None else records
        if not records:
            raise UserError(f"--data {self.data} has no records after --offset {self.offset}")
        return records

    @property
    def root(self) -> Path:
        return self.image_root or Path(self.data).parent

