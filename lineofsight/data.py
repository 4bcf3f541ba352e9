"""Datasets in the layouts the real data uses: an ImageNet folder and ShareGPT4V JSON.

ImageNet layout: ``<root>/imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``)
and ``<root>/<split>/<wnid>/<image files>``. Class names are matched case-insensitively, with
``_`` and spaces interchangeable. Image problems (a file that is missing, does not decode or is a
decompression bomb) and ShareGPT4V records of the wrong shape are never fatal and never silent:
:class:`SkipCounter` counts them by reason and the scripts report the counts. Text files are read
as UTF-8; anything else is a one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lineofsight.cli import UserError
from lineofsight.io import read_json, read_text
from lineofsight.models import Dtype

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassIndex",
    "CaptionRecord",
    "ImageItem",
    "MAX_RESIZE",
    "SkipCounter",
    "check_resize",
    "check_resize_match",
    "recorded_resize",
    "imagenet_items",
    "load_image",
    "pair_key",
    "parse_pair",
    "read_class_pairs",
    "read_sharegpt4v",
    "resize_image",
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
        raw = read_json(path, "class index")
        try:
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
    text = read_text(path, "--classes file")
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
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
    pairs = []
    for n, line in enumerate(read_text(path, "pairs file").splitlines(), 1):
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


MAX_RESIZE = 8192
"""The largest ``--resize`` accepted: 8192 x 8192 RGB is 200 MB per image, far beyond any VLM's input."""


def check_resize(resize: int | None, flag: str = "--resize") -> int | None:
    """``resize`` if it is None or in ``1..MAX_RESIZE``, else :class:`UserError`. Scripts call it in
    their config's ``__post_init__``, so a bad value fails before any work (and never inside a
    DataLoader worker)."""
    if resize is not None and (isinstance(resize, bool) or not 1 <= resize <= MAX_RESIZE):
        raise UserError(f"{flag} {resize}: expected a side length in pixels from 1 to {MAX_RESIZE}")
    return resize


UNRECORDED = "unrecorded"
"""What :func:`recorded_resize` gives for an artifact written before its resize was recorded (nothing to check)."""


def recorded_resize(info: dict[str, Any]) -> int | None | str:
    """The ``resize`` an artifact's metadata records (an int, or None for full-size images), or :data:`UNRECORDED`."""
    return info.get("resize", UNRECORDED)


def describe_resize(resize: Any) -> str:
    return "full-size images" if resize is None else f"{resize} x {resize} px images"


def check_resize_match(resize: int | None | str, produced: int | None | str, what: str, allow: bool,
                       reader: str = "") -> None:
    """One resize convention per pipeline: images read at ``resize`` (this script's ``--resize``) must be read as
    the ones ``what`` was made from (``produced``: an artifact's recorded resize) were, or the token counts and the
    image grid differ from the ones the artifact describes. :class:`UserError` naming both, unless ``allow``
    (``--allow-resize-mismatch``) or either side predates the record (:data:`UNRECORDED`). ``reader`` names the
    other artifact when two artifacts are compared (no images read here, so no ``--resize`` to fix)."""
    if allow or UNRECORDED in (resize, produced) or produced == resize:
        return
    if reader:
        raise UserError(f"{reader} was made from {describe_resize(resize)}, but {what} from "
                        f"{describe_resize(produced)} (a different image-token count and grid); use a matching "
                        "pair, or --allow-resize-mismatch")
    fix = "none" if produced is None else produced
    raise UserError(f"--resize {'none' if resize is None else resize} reads {describe_resize(resize)}, but {what} "
                    f"was made from {describe_resize(produced)} (a different image-token count and grid); pass "
                    f"--resize {fix}{' (or leave it out)' if produced is None else ''}, or --allow-resize-mismatch")


def load_image(path: Path | str, skips: SkipCounter | None = None, resize: int | None = None) -> Image.Image | None:
    """RGB image at ``path`` (optionally resized to ``resize`` x ``resize``), or None, counted in ``skips``.

    Reasons: ``missing``; ``corrupt`` (does not decode); ``too large`` (more pixels than PIL's
    decompression-bomb limit, twice ``Image.MAX_IMAGE_PIXELS``: a tiny PNG can claim 30000 x 30000
    pixels and take gigabytes to decode). PIL's default limit is kept.
    """
    check_resize(resize)
    path = Path(path)
    reason = None
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        reason = "missing"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning when made an error
        reason = "too large"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        reason = "corrupt"
    if reason is not None:
        if skips is not None:
            skips.add(reason, str(path))
        return None
    return resize_image(image, resize)


def resize_image(image: Image.Image, resize: int | None) -> Image.Image:
    """``image`` resized to ``resize`` x ``resize`` px (bicubic, as the paper's 336 x 336), or as it is for None."""
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


def read_sharegpt4v(path: Path | str, limit: int | None = None, skips: SkipCounter | None = None
                    ) -> list[CaptionRecord]:
    """Records of a ShareGPT4V-format JSON list (``{"id", "image", "conversations": [...]}``).

    The question is the first human turn without its ``<image>`` tag; the caption the first gpt
    turn. A record of the wrong shape (not an object, ``conversations`` not a list of
    ``{"from", "value"}`` objects, a non-string image or turn value) is skipped as ``malformed
    record``, and one without an image or without a human and a gpt turn as ``no image or
    caption``; both are counted in ``skips`` (without ``skips``, a one-line warning on stderr
    says how many). At most ``limit`` records are returned.

    :class:`UserError` when ``limit`` is not positive, the file is missing, not UTF-8 JSON or
    not a list, or none of its records is usable.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise UserError(f"--limit must be positive, got {limit}")
    path = Path(path)
    raw = read_json(path, "--data", shape="list")
    counter = SkipCounter() if skips is None else skips
    before = counter.total
    records: list[CaptionRecord] = []
    for i, rec in enumerate(raw):
        parsed = _caption_record(rec, default_id=str(len(records)))
        if isinstance(parsed, str):
            counter.add(parsed, f"{path.name} record {i}")
            continue
        records.append(parsed)
        if limit is not None and len(records) >= limit:
            break
    n_skipped = counter.total - before
    if not records:
        detail = f" ({counter.summary()})" if n_skipped else ""
        raise UserError(f"--data {path}: none of its {len(raw)} records is a usable ShareGPT4V record{detail}")
    if skips is None and n_skipped:
        print(f"warning: --data {path}: {counter.summary()}", file=sys.stderr, flush=True)
    return records


def _caption_record(rec: Any, default_id: str) -> CaptionRecord | str:
    """One ShareGPT4V record as a :class:`CaptionRecord`, or why it is skipped."""
    malformed, unusable = "malformed record", "no image or caption"
    if not isinstance(rec, dict):
        return malformed
    turns, image = rec.get("conversations"), rec.get("image")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return malformed
    if image is not None and not isinstance(image, str):
        return malformed
    first: dict[str, str] = {}  # the first human and the first gpt turn
    for turn in turns:
        who = turn.get("from")
        if who in ("human", "gpt") and who not in first:
            if not isinstance(turn.get("value"), str):
                return malformed
            first[who] = turn["value"]
    human, gpt = first.get("human"), first.get("gpt")
    if not image or human is None or gpt is None:
        return unusable
    rec_id = rec.get("id", default_id)
    return CaptionRecord(str(rec_id), image, human.replace("<image>", "").strip(), gpt.strip())


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
    resize: int | None = None
    """Resize images to N x N px before the processor (the paper: 336); must match the resize the SAE was trained
    at (its cfg.json), see --allow-resize-mismatch."""
    load_threads: int = 2
    """Threads that decode and preprocess (the processor) the next batches' images while the model runs (0: none)."""
    allow_resize_mismatch: bool = False
    """Run even when --resize differs from the SAE's (a different image-token count and grid: normally a mistake)."""

    def __post_init__(self) -> None:
        check_resize(self.resize)
        if self.load_threads < 0:
            raise UserError("--load-threads must be >= 0")
        if self.batch_size < 1 or self.max_caption_tokens < 1:
            raise UserError("--batch-size and --max-caption-tokens must be positive")
        if self.offset < 0:
            raise UserError(f"--offset must be >= 0, got {self.offset}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be positive, got {self.limit}")

    def read_records(self, skips: SkipCounter | None = None) -> list[CaptionRecord]:
        """The records ``[offset : offset + limit]`` of ``--data``; :class:`UserError` when none are left.
        Malformed records are counted in ``skips`` (see :func:`read_sharegpt4v`)."""
        records = read_sharegpt4v(self.data, skips=skips)[self.offset :]
        records = records[: self.limit] if self.limit is not None else records
        if not records:
            raise UserError(f"--data {self.data} has no records after --offset {self.offset}")
        return records

    @property
    def root(self) -> Path:
        return self.image_root or Path(self.data).parent

