"""The embedded default: a synthetic shape world, and how a VLM trained on it is evaluated.

The world is a seeded generator of 64x64 images with one coloured shape each (``CLASSES`` x
``COLOURS`` x ``SIZES`` x ``BACKGROUNDS``, random position and tilt). :func:`generate_world`
writes it in the layouts the real data uses (an ImageNet folder with
``imagenet_class_index.json``, a ShareGPT4V-style caption JSON, ``class_pairs.txt``), so every
experiment script runs unchanged on it, and a lettered multiple-choice task (:data:`MC_SUBJECTS`: which
shape, which colour) about held-out images in the schemas of two Hugging Face benchmarks (A-OKVQA and
MMMU-Pro, ``save_to_disk`` folders under ``benchmarks/``).

The toy model (a real ``transformers.LlavaNextForConditionalGeneration`` with a word-level
tokenizer, committed in ``data/toy/model``) is built and trained by ``scripts/train_toy_vlm.py``
and loaded like any other model by :func:`lineofsight.models.load_vlm` (``"toy"``);
:func:`evaluate_toy` measures a model on the world's held-out images.

Nothing here imports torch or transformers at module level, so scripts can import the world's
constants without slowing ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from lineofsight import paths
from lineofsight.cli import UserError
from lineofsight.data import ClassIndex, imagenet_items, load_image
from lineofsight.models import format_prompt
from lineofsight.prompts import (
    CAPTION_QUESTION,
    FORCED_CHOICE_TEMPLATE,
    MC_LETTERS,
    YESNO_TEMPLATE,
    multiple_choice,
)

if TYPE_CHECKING:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "MC_SUBJECTS",
    "N_MC_OPTIONS",
    "SIZES",
    "MCItem",
    "ToySample",
    "WorldConfig",
    "caption_for",
    "class_pairs",
    "ensure_toy_world",
    "evaluate_toy",
    "generate_answers",
    "generate_world",
    "heldout_samples",
    "make_samples",
    "mc_item",
    "mc_items",
    "mc_task",
    "render_sample",
    "wnid",
]

# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring")
"""Shape classes; single lowercase words, also the ImageNet-layout class names."""
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUNDS: tuple[str, ...] = ("dark", "light", "noisy")

WNID_BASE = 90_000_000
"""Made-up WordNet ids: class ``i`` is ``n{WNID_BASE + i}`` (``n90000000``, ...)."""
WORLD_VERSION = 3
"""Bump when the generator's output changes, so stale worlds on disk are regenerated."""

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
}
# Half-extent of the shape as a fraction of the image side, per size word.
_RADIUS = {"small": (0.2, 0.25), "medium": (0.29, 0.33), "large": (0.37, 0.42)}
# Independent random streams: the same (seed, stream, index) always yields the same image, and
# the training stream never overlaps the held-out or world splits.
_STREAMS = {"imagenet/train": 1, "imagenet/val": 2, "sharegpt4v": 3, "train": 4, "heldout": 5, "pairs": 6,
            "benchmark/aokvqa": 7, "benchmark/mmmu_pro": 8}
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class ToySample:
    """One labelled world image."""

    image: Image.Image
    cls: str
    colour: str
    size: str
    background: str
    mask: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    """shape coverage in [0, 1], shape (H, W)"""

    @property
    def label(self) -> int:
        return CLASSES.index(self.cls)

    @property
    def caption(self) -> str:
        return caption_for(self.cls, self.colour, self.size, self.background)


def caption_for(cls: str, colour: str, size: str, background: str) -> str:
    """The world's caption, words separated by spaces (the tokenizer's decode round-trips it)."""
    return f"a {size} {colour} {cls} on a {background} background ."


def wnid(label: int) -> str:
    return f"n{WNID_BASE + label}"


def _unit_polygon(cls: str) -> np.ndarray | None:
    """Outline of ``cls`` in unit coordinates (radius ~1, y down), shape (n_points, 2); None for round shapes."""
    if cls == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if cls == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a) + 0.15], 1)
    if cls == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)
    if cls == "cross":
        w, a = 0.24, 0.95  # half-width and arm length
        return np.array(
            [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]]
        )
    if cls == "diamond":
        return np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]])
    if cls == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x / 16.5, -(y + 2.5) / 15.0], 1)
    if cls in ("circle", "ring"):
        return None
    raise ValueError(f"unknown class {cls!r}")


def _shape_mask(cls: str, cx: float, cy: float, radius: float, angle: float, image_size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (image_size, image_size); drawn at 4x then box-reduced."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (image_size * s, image_size * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _unit_polygon(cls)
    if poly is None:
        r = radius * 0.9 * s
        draw.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=255)
        if cls == "ring":
            r = radius * 0.5 * s
            draw.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=0)
    else:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = (poly @ rot.T) * radius + np.array([cx, cy])
        draw.polygon([(float(x) * s, float(y) * s) for x, y in pts], fill=255)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def render_sample(seed: int, stream: str, index: int, image_size: int = 64, cls: str | None = None) -> ToySample:
    """Deterministically render image ``index`` of ``stream``; the class is drawn at random unless given."""
    rng = np.random.default_rng([seed, _STREAMS[stream], index])
    cls = cls if cls is not None else CLASSES[int(rng.integers(len(CLASSES)))]
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    lo, hi = _RADIUS[size]
    radius = float(rng.uniform(lo, hi)) * image_size
    margin = radius + 1.5
    cx, cy = (float(v) for v in rng.uniform(margin, image_size - margin, 2))
    angle = float(np.deg2rad(rng.uniform(-15, 15)))

    n = image_size
    if background == "dark":
        bg = rng.uniform(0, 45, 3) + rng.normal(0, 4, (n, n, 3))
    elif background == "light":
        bg = rng.uniform(205, 250, 3) + rng.normal(0, 4, (n, n, 3))
    else:  # noisy: mid-grey with strong per-pixel colour noise
        bg = rng.uniform(80, 170) + rng.uniform(-20, 20, 3) + rng.normal(0, 12, (n, n, 3))
    fg = np.array(_RGB[colour], dtype=np.float64) + rng.integers(-20, 21, 3)
    mask = _shape_mask(cls, cx, cy, radius, angle, image_size)[..., None].astype(np.float64)
    pixels = bg * (1 - mask) + fg * mask + rng.normal(0, 3, (n, n, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return ToySample(image=image, cls=cls, colour=colour, size=size, background=background, mask=mask[..., 0])


def make_samples(n_per_class: int, seed: int = 0, stream: str = "heldout", image_size: int = 64) -> list[ToySample]:
    """``n_per_class`` images of every class, classes interleaved (sample ``i`` has class ``i % n_classes``)."""
    n = n_per_class * len(CLASSES)
    return [render_sample(seed, stream, i, image_size, cls=CLASSES[i % len(CLASSES)]) for i in range(n)]


def heldout_samples(n_per_class: int = 4, seed: int = 0, image_size: int = 64) -> list[ToySample]:
    """Fresh labelled images from a stream that neither the world files nor training ever use."""
    return make_samples(n_per_class, seed=seed, stream="heldout", image_size=image_size)


def class_pairs(seed: int = 0, n_pairs: int = 8) -> list[tuple[str, str]]:
    """``n_pairs`` distinct seeded ordered (src, tgt) pairs of different classes."""
    all_pairs = [(a, b) for a in CLASSES for b in CLASSES if a != b]
    if not 0 < n_pairs <= len(all_pairs):
        raise ValueError(f"n_pairs must be in [1, {len(all_pairs)}], got {n_pairs}")
    order = np.random.default_rng([seed, _STREAMS["pairs"]]).permutation(len(all_pairs))
    return [all_pairs[i] for i in order[:n_pairs]]


# ---------------------------------------------------------------------------------------------
# The lettered multiple-choice task
# ---------------------------------------------------------------------------------------------

MC_SUBJECTS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "Shape": ("Which shape is shown in this image?", (CLASSES[:4], CLASSES[4:])),
    "Colour": ("What colour is the shape?", (COLOURS[:4], COLOURS[4:] + COLOURS[:2])),
}
"""The world's multiple-choice subjects: the question and its option lists. An item about an image lists the first
option list that holds the image's true name, in that fixed order, so each name always has the same letter (circle
A, cross A, heart C, ...; red A, purple A, ...). Real benchmarks shuffle their options; the toy model does not learn
to point from the matching option to its letter within its training budget (a retrain with the options shuffled
reached 0.49 / 0.27 on shape / colour, chance 0.25), while the fixed order it learns like the forced choice. The
prompt is :func:`lineofsight.prompts.multiple_choice` of the question and the options; the answer is the letter."""
N_MC_OPTIONS = 4
"""Options per item (MMMU-Pro "standard (4 options)", A-OKVQA)."""


@dataclasses.dataclass(frozen=True)
class MCItem:
    """A lettered multiple-choice question about one world image."""

    sample: ToySample
    subject: str
    """a key of :data:`MC_SUBJECTS`"""
    options: tuple[str, ...]
    answer: int
    """index of the true option"""

    @property
    def question(self) -> str:
        return MC_SUBJECTS[self.subject][0]

    @property
    def letter(self) -> str:
        return MC_LETTERS[self.answer]

    @property
    def prompt(self) -> str:
        return multiple_choice(self.question, self.options)


def mc_item(sample: ToySample, subject: str) -> MCItem:
    """The item of ``subject`` about ``sample``: the subject's first option list holding the sample's true name."""
    true = sample.cls if subject == "Shape" else sample.colour
    options = next(names for names in MC_SUBJECTS[subject][1] if true in names)
    return MCItem(sample, subject, options, options.index(true))


def mc_items(samples: Sequence[ToySample], subjects: Sequence[str] = tuple(MC_SUBJECTS)) -> list[MCItem]:
    """One item per sample and subject, sample-major."""
    return [mc_item(sample, subject) for sample in samples for subject in subjects]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world's bytes; written to ``world.json`` as its stamp."""

    seed: int = 0
    image_size: int = 64
    n_train_per_class: int = 64
    n_val_per_class: int = 16
    n_captions: int = 512
    n_pairs: int = 8
    n_benchmark: int = 96
    version: int = WORLD_VERSION
    classes: tuple[str, ...] = CLASSES
    colours: tuple[str, ...] = COLOURS


def _stamp(cfg: WorldConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as read back from disk


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "world.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _benchmark_items(cfg: WorldConfig) -> dict[str, list[MCItem]]:
    """The items of both benchmarks, ``n_benchmark`` each, on fresh images of their own streams (class-balanced):
    A-OKVQA asks the shape of ``n_benchmark`` images, MMMU-Pro the shape and the colour of half as many."""
    n_per_class = cfg.n_benchmark // len(CLASSES)
    aokvqa = make_samples(n_per_class, cfg.seed, "benchmark/aokvqa", cfg.image_size)
    mmmu_pro = make_samples(n_per_class // len(MC_SUBJECTS), cfg.seed, "benchmark/mmmu_pro", cfg.image_size)
    return {"aokvqa": mc_items(aokvqa, ("Shape",)), "mmmu_pro": mc_items(mmmu_pro)}


def _write_benchmarks(root: Path, cfg: WorldConfig) -> None:
    """``root/aokvqa`` and ``root/mmmu_pro``: ``DatasetDict`` s in the columns and feature types of
    ``HuggingFaceM4/A-OKVQA`` (split ``validation``) and ``MMMU/MMMU_Pro`` "standard (4 options)" (split ``test``)."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    string, image = datasets.Value("string"), datasets.Image()
    aokvqa_features = datasets.Features(
        {
            "question_id": string,
            "image": image,
            "question": string,
            "choices": datasets.List(string),
            "correct_choice_idx": datasets.Value("int8"),
            "direct_answers": datasets.List(string),
            "difficult_direct_answer": datasets.Value("bool"),
            "rationales": datasets.List(string),
        }
    )
    image_columns = [f"image_{i}" for i in range(1, 8)]
    mmmu_features = datasets.Features(
        {
            "id": string,
            "question": string,
            "options": string,
            "explanation": string,
            **{c: image for c in image_columns},
            "image_type": string,
            "answer": string,
            "topic_difficulty": string,
            "subject": string,
        }
    )
    items = _benchmark_items(cfg)
    aokvqa = [
        {
            "question_id": f"toy_aokvqa_{i:05d}",
            "image": it.sample.image,
            "question": it.question,
            "choices": list(it.options),
            "correct_choice_idx": it.answer,
            "direct_answers": [it.options[it.answer]] * 10,  # A-OKVQA has ten annotators' answers
            "difficult_direct_answer": False,
            "rationales": [f"The image shows {it.sample.caption}"],
        }
        for i, it in enumerate(items["aokvqa"])
    ]
    n_seen = dict.fromkeys(MC_SUBJECTS, 0)
    mmmu_pro = []
    for it in items["mmmu_pro"]:
        n_seen[it.subject] += 1
        mmmu_pro.append(
            {
                "id": f"test_{it.subject}_{n_seen[it.subject]}",  # MMMU's <split>_<subject>_<n>
                "question": it.question,
                "options": repr(list(it.options)),  # MMMU stores the Python repr of the list
                "explanation": "",
                "image_1": it.sample.image,
                **dict.fromkeys(image_columns[1:]),
                "image_type": "Diagrams",
                "answer": it.letter,
                "topic_difficulty": "Easy",
                "subject": it.subject,
            }
        )
    bars_were_on = not are_progress_bars_disabled()
    disable_progress_bars()  # "Saving the dataset" bars would interleave with a script's own output
    try:
        for name, split, rows, features in (
            ("aokvqa", "validation", aokvqa, aokvqa_features),
            ("mmmu_pro", "test", mmmu_pro, mmmu_features),
        ):
            ds = datasets.Dataset.from_list(rows, features=features)
            datasets.DatasetDict({split: ds}).save_to_disk(str(root / name))
    finally:
        if bars_were_on:
            enable_progress_bars()


def _write_world(tmp: Path, cfg: WorldConfig) -> None:
    inet = tmp / "imagenet"
    index = {str(i): [wnid(i), name] for i, name in enumerate(CLASSES)}
    inet.mkdir(parents=True)
    (inet / "imagenet_class_index.json").write_text(json.dumps(index))
    for split, n_per_class in (("train", cfg.n_train_per_class), ("val", cfg.n_val_per_class)):
        samples = make_samples(n_per_class, cfg.seed, f"imagenet/{split}", cfg.image_size)
        for i, sample in enumerate(samples):
            folder = inet / split / wnid(sample.label)
            folder.mkdir(parents=True, exist_ok=True)
            sample.image.save(folder / f"{wnid(sample.label)}_{i:05d}.png")

    records = []
    (tmp / "sharegpt4v").mkdir()
    for i in range(cfg.n_captions):
        sample = render_sample(cfg.seed, "sharegpt4v", i, cfg.image_size)
        rel = f"sharegpt4v/{i:06d}.png"
        sample.image.save(tmp / rel)
        records.append(
            {
                "id": f"toy-{i:06d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{CAPTION_QUESTION}"},
                    {"from": "gpt", "value": sample.caption},
                ],
            }
        )
    (tmp / "sharegpt4v.json").write_text(json.dumps(records, indent=1) + "\n")
    _write_benchmarks(tmp / "benchmarks", cfg)
    pairs = class_pairs(cfg.seed, cfg.n_pairs)
    (tmp / "class_pairs.txt").write_text("".join(f"{a}@{b}\n" for a, b in pairs))
    (tmp / "world.json").write_text(json.dumps(_stamp(cfg), indent=1) + "\n")  # written last: marks completeness


def generate_world(
    root: Path | str = paths.TOY_WORLD_DIR,
    seed: int = 0,
    *,
    image_size: int = 64,
    n_train_per_class: int = 64,
    n_val_per_class: int = 16,
    n_captions: int = 512,
    n_pairs: int = 8,
    n_benchmark: int = 96,
) -> Path:
    """Write the shape world under ``root`` (no-op when ``root/world.json`` matches) and return ``root``.

    Layout::

        root/imagenet/imagenet_class_index.json     {"0": ["n90000000", "circle"], ...}
        root/imagenet/{train,val}/<wnid>/<wnid>_<i>.png
        root/sharegpt4v.json                        [{"id", "image": "sharegpt4v/000000.png", "conversations"}]
        root/sharegpt4v/*.png
        root/class_pairs.txt                        one ``src@tgt`` per line
        root/benchmarks/aokvqa/                     DatasetDict {"validation"} in HuggingFaceM4/A-OKVQA's schema
        root/benchmarks/mmmu_pro/                   DatasetDict {"test"} in MMMU/MMMU_Pro "standard (4 options)"'s
        root/world.json                             the generator config (the stamp)

    The world is built in a temporary sibling folder and renamed into place, so a reader never
    sees a half-written world; a stale world (different stamp) is replaced. A non-empty ``root``
    without a stamp is refused rather than deleted. ``n_benchmark`` (items per benchmark, see
    :func:`_benchmark_items`) must be a positive multiple of twice the number of classes.
    """
    root = Path(root)
    step = len(CLASSES) * len(MC_SUBJECTS)
    if n_benchmark < step or n_benchmark % step:
        raise ValueError(f"n_benchmark must be a positive multiple of {step}, got {n_benchmark}")
    cfg = WorldConfig(
        seed=seed,
        image_size=image_size,
        n_train_per_class=n_train_per_class,
        n_val_per_class=n_val_per_class,
        n_captions=n_captions,
        n_pairs=n_pairs,
        n_benchmark=n_benchmark,
    )
    if _read_stamp(root) == _stamp(cfg):
        return root
    if root.exists() and _read_stamp(root) is None and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and has no world.json; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_world(tmp, cfg)
        if root.exists():
            if _read_stamp(root) == _stamp(cfg):  # another process finished first
                return root
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / "world")
            shutil.rmtree(trash)
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_stamp(root) != _stamp(cfg):  # lost a race against a different config
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_toy_world(*candidates: Path | str | None) -> None:
    """Generate the default world (seed 0) when one of ``candidates`` points into it and it is missing
    or stale: scripts whose defaults are the toy world then work on a fresh checkout."""
    root = paths.TOY_WORLD_DIR.resolve()
    for path in candidates:
        if path is not None and Path(path).resolve().is_relative_to(root):
            generate_world(paths.TOY_WORLD_DIR)
            return


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@dataclasses.dataclass(frozen=True)
class _Query:
    task: str
    image_index: int
    question: str
    expected: str


def _eval_queries(labels: Sequence[int], seed: int) -> list[_Query]:
    """Per image: a caption, a forced choice (seeded distractor and order), and a yes and a no question."""
    rng = np.random.default_rng([seed, 7])
    queries = []
    for i, label in enumerate(labels):
        cls = CLASSES[label]
        other = CLASSES[(label + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)]
        a, b = (cls, other) if rng.integers(2) == 0 else (other, cls)
        queries += [
            _Query("caption", i, CAPTION_QUESTION, cls),
            _Query("forced_choice", i, FORCED_CHOICE_TEMPLATE.format(a=a, b=b), cls),
            _Query("yesno", i, YESNO_TEMPLATE.format(name=cls), "yes"),
            _Query("yesno", i, YESNO_TEMPLATE.format(name=other), "no"),
        ]
    return queries


def _is_correct(query: _Query, answer: str) -> bool:
    words = _words(answer)
    if query.task == "caption":  # the right class named, and no other class
        return query.expected in words and not any(c in words for c in CLASSES if c != query.expected)
    if query.task.startswith("mc_"):  # the letter alone: a caption's leading article "a" is not option A
        return words == [query.expected]
    return bool(words) and words[0] == query.expected


def generate_answers(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy batched generation with left padding; returns the decoded new text of each prompt."""
    import torch

    tok = processor.tokenizer
    old_side, tok.padding_side = tok.padding_side, "left"
    try:
        if images is None:
            inputs = tok(list(prompts), return_tensors="pt", padding=True)
        else:
            inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    with torch.no_grad():
        out_BT = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new_BT = out_BT[:, inputs["input_ids"].shape[1] :]
    return [s.strip() for s in tok.batch_decode(new_BT, skip_special_tokens=True)]


def _val_split(world_dir: Path, n_per_class: int) -> tuple[list[Image.Image], list[int]]:
    """The world's ``imagenet/val`` images and labels: label order, sorted files, at most ``n_per_class`` each."""
    root = world_dir / "imagenet"
    index = ClassIndex.read(root)
    items = imagenet_items(root, "val", range(len(index.names)), index, per_class=n_per_class)
    images = [load_image(root / item.path) for item in items]
    unreadable = [item.path for item, image in zip(items, images) if image is None]
    if unreadable:
        raise UserError(f"{root}: {len(unreadable)} val images cannot be read, e.g. {unreadable[0]}")
    return images, [item.label for item in items]


def _mc_samples(world_dir: Path, n_per_class: int) -> list[ToySample]:
    """The images of a world's MMMU-Pro-style benchmark, re-rendered from its stamp: with ``n_per_class`` up to
    ``n_benchmark / 16`` they are exactly the benchmark's, beyond it more of the same stream."""
    stamp = _read_stamp(world_dir)
    if stamp is None:
        raise UserError(f"{world_dir}: no world.json, so no multiple-choice items (generate the world first)")
    return make_samples(n_per_class, int(stamp["seed"]), "benchmark/mmmu_pro", int(stamp["image_size"]))


def mc_task(subject: str) -> str:
    """The name of a multiple-choice subject's task in :func:`evaluate_toy` (``mc_shape``, ``mc_colour``)."""
    return f"mc_{subject.lower()}"


def evaluate_toy(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    world_dir_or_samples: Path | str | Sequence[ToySample],
    n_per_class: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    n_examples: int = 4,
) -> dict[str, Any]:
    """Held-out accuracies of the toy VLM by batched greedy generation.

    ``world_dir_or_samples`` is a world folder (its ``imagenet/val`` split is read, at most
    ``n_per_class`` images per class) or a list of :class:`ToySample` (used as given). Per image:
    the caption must name the right class and no other; the forced choice's first word must be
    the class; a yes question (true class) and a no question (another class) are asked, so
    ``yesno_acc`` is balanced. The lettered multiple choice (:func:`mc_items`: a shape and a colour
    item per image, the answer must be the letter alone) is asked about the same samples, or
    for a world folder about its MMMU-Pro benchmark's images (the val files do not say the colour;
    :func:`_mc_samples`). Returns ``caption_acc``, ``forced_choice_acc``, ``yesno_acc``,
    ``mc_shape_acc``, ``mc_colour_acc``, ``n_images`` and ``examples``: (task, question, answer,
    expected) tuples.
    """
    if isinstance(world_dir_or_samples, (str, Path)):
        images, labels = _val_split(Path(world_dir_or_samples), n_per_class)
        mc_samples = _mc_samples(Path(world_dir_or_samples), n_per_class)
    else:
        images = [s.image for s in world_dir_or_samples]
        labels = [s.label for s in world_dir_or_samples]
        mc_samples = list(world_dir_or_samples)
    if not images:
        raise ValueError("no evaluation images")
    queries = _eval_queries(labels, seed)
    n_images = len(images)
    for k, item in enumerate(mc_items(mc_samples)):  # their images follow the others in ``images``
        if k % len(MC_SUBJECTS) == 0:
            images.append(item.sample.image)
        queries.append(_Query(mc_task(item.subject), len(images) - 1, item.prompt, item.letter.lower()))
    tasks = ("caption", "forced_choice", "yesno", *(mc_task(s) for s in MC_SUBJECTS))
    max_new_tokens = {"caption": 16, "forced_choice": 3, "yesno": 3}
    answers: list[str] = [""] * len(queries)
    for task in tasks:
        idx = [i for i, q in enumerate(queries) if q.task == task]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            prompts = [format_prompt(processor, queries[i].question) for i in chunk]
            chunk_images = [images[queries[i].image_index] for i in chunk]
            outs = generate_answers(model, processor, prompts, chunk_images, max_new_tokens.get(task, 2))
            for i, out in zip(chunk, outs):
                answers[i] = out
    result: dict[str, Any] = {"n_images": n_images}
    for task in tasks:
        hits = [_is_correct(q, a) for q, a in zip(queries, answers) if q.task == task]
        result[f"{task}_acc"] = float(np.mean(hits))
    examples = []
    for task in tasks:
        of_task = [i for i, q in enumerate(queries) if q.task == task]
        picked = of_task[:: max(1, len(of_task) // max(1, n_examples))][:n_examples]  # spread over classes
        examples += [(task, queries[i].question, answers[i], queries[i].expected) for i in picked]
    result["examples"] = examples
    return result
