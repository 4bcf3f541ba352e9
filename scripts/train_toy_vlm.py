"""Train the toy LLaVA-NeXT on the shape world, from scratch, on CPU, in under 10 minutes.

Three stages, like LLaVA's pre-trained CLIP followed by visual instruction tuning:

1. **Vision pre-training** (about 160 s). The CLIP tower and the projector learn shape, colour,
   size and background (see :func:`pretrain_vision`: max-pooled attribute heads, a per-patch
   class head, and the mean projected image token aligned with the caption words' embeddings).
   Training the tower jointly with the language model from scratch stalls (about 60 % caption
   accuracy after 5 minutes); pre-training it does not.
1b. **Yes/no in text** (about 90 s). The language model learns to answer
   ``Is there a <class> in this image?`` about a caption given as text. Learnt from the image
   alone, the comparison of the question's word with what is shown stays at chance for the whole
   budget (the loss only rewards the product of two signals); in a short text context it is
   learnt in seconds, and stage 2 then only has to feed it what the image shows.
2. **VLM training** (about 310 s). The projector, ``image_newline``, the Mistral backbone and (at
   a lower learning rate) the tower learn captioning, the steering forced choice
   (``Reply either "a" or "b" ...`` -> class word), balanced yes/no questions (about the class or
   the colour), lettered multiple choice (which shape / which colour of four options -> the
   option's letter, the toy world's benchmark task) and text-only rows, with the per-patch class
   loss kept on the projected image tokens. The loss is taken on the answer tokens and EOS only,
   averaged per example. (The options come in a fixed order per name, see
   :data:`lineofsight.toy.MC_SUBJECTS`: with shuffled options the lettered task stayed near chance.)

At the end the held-out accuracies (fresh images from a stream training never sees) and a few
generations are printed, and the model + processor are saved with ``save_pretrained`` into
``--out``, next to ``training.json`` (the accuracies and losses) and ``run.json`` (the config,
git SHA and versions). The toy model's tokenizer, processor and architecture are built here
(:func:`build_toy_processor`, :func:`build_toy_model`); everything else loads the saved folder
with :func:`lineofsight.models.load_vlm`.

    python scripts/train_toy_vlm.py --overwrite       # rewrites data/toy/model (10 min 40 s on 2 cores, bit-identical weights)
    python scripts/train_toy_vlm.py --tiny --out /tmp/toy --overwrite   # seconds; for tests
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineofsight.cli import UserError
from lineofsight.paths import TOY_MODEL_DIR
from lineofsight.prompts import (
    CAPTION_QUESTION,
    COLOUR_YESNO_TEMPLATE,
    FORCED_CHOICE_TEMPLATE,
    MC_LETTERS,
    YESNO_TEMPLATE,
    multiple_choice,
)
from lineofsight.run import Run, lifecycle
from lineofsight.toy import (  # numpy + PIL only; keeps --help instant
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    MC_SUBJECTS,
    SIZES,
    ToySample,
    caption_for,
    evaluate_toy,
    heldout_samples,
    mc_item,
    mc_task,
    render_sample,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, PreTrainedTokenizerFast

SCRIPT = "scripts/train_toy_vlm.py"
TRAINING_RECORD = "training.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
"""What ``save_pretrained`` of the toy model and its processor writes (checked at save time)."""


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy LLaVA-NeXT (the defaults are the committed model's)."""

    tile_size: int = 32
    """vision tower input side in pixels (anyres tiles are this size)"""
    patch_size: int = 8
    """vision patch side in pixels"""
    vision_hidden: int = 64
    """width of the CLIP vision tower"""
    vision_layers: int = 3
    """CLIP encoder layers"""
    vision_heads: int = 4
    """CLIP attention heads"""
    vision_intermediate: int = 256
    """CLIP MLP width"""
    text_hidden: int = 128
    """width of the Mistral text backbone (the residual stream the experiments read)"""
    text_layers: int = 6
    """Mistral decoder blocks"""
    text_heads: int = 4
    """Mistral attention heads"""
    text_kv_heads: int = 2
    """Mistral key/value heads (grouped-query attention)"""
    text_intermediate: int = 256
    """Mistral MLP width"""
    vision_feature_layer: int = -1
    """hidden_states index of the tower fed to the projector (-1: last layer, pre post-layernorm)"""
    tie_word_embeddings: bool = True
    """share the input embedding and the LM head: a class word's embedding then lives where the
    model writes the class it sees, which makes "Is there a <class>?" a dot product to learn"""


@dataclasses.dataclass
class Config:
    out: Path = TOY_MODEL_DIR
    """folder the trained model + processor are written to (with training.json and run.json)"""
    overwrite: bool = False
    """replace an earlier run of this script in --out (only the files it wrote are removed)"""
    seed: int = 0
    """seeds the model init, the training images (world stream "train") and the batch order"""
    tiny: bool = False
    """seconds-long run for tests: tiny model, few images and steps (overrides the sizes below)"""
    model: ToyModelConfig = ToyModelConfig()
    """architecture sizes"""
    image_size: int = 64
    """side of the world images in pixels (64 -> 2x2 anyres tiles of 32 plus the base tile)"""
    n_images: int = 6000
    """distinct training images, rendered in memory from the world generator"""
    pretrain_steps: int = 1400
    """stage 1: vision-tower classification steps"""
    pretrain_batch_size: int = 64
    """stage 1: images per step"""
    pretrain_lr: float = 3e-3
    """stage 1: AdamW peak learning rate"""
    dense_weight: float = 1.0
    """stage 1: weight of the per-patch class loss (see pretrain_vision)"""
    dense_weight_vlm: float = 0.5
    """stage 2: weight of the same per-patch loss on the projected image tokens, so the VLM training
    keeps the class readable from every shape token (and from their mean: what the probes read)"""
    steps: int = 800
    """stage 2: VLM steps"""
    batch_size: int = 32
    """stage 2: image examples per step"""
    text_batch_size: int = 8
    """stage 2: text-only caption examples per step (no image)"""
    lr: float = 1e-3
    """stage 2: AdamW peak learning rate (linear warmup, cosine decay to 10 %)"""
    warmup_frac: float = 0.05
    """fraction of each stage spent warming up the learning rate"""
    p_caption: float = 0.35
    """stage 2: probability an image example is a caption"""
    p_forced_choice: float = 0.1
    """stage 2: probability an image example is a forced choice"""
    p_multiple_choice: float = 0.2
    """stage 2: probability an image example is a lettered multiple choice (the rest are yes/no)"""
    p_colour_question: float = 0.25
    """stage 2: fraction of yes/no examples that ask about the colour instead of the class"""
    text_steps: int = 600
    """stage 1b: steps of text-only yes/no questions about captions (batch_size rows each)"""
    max_filler: int = 12
    """stage 1b: up to this many "." tokens between the caption and the question"""
    yesno_only_until: float = 0.0
    """stage 2 curriculum: fraction of the steps in which every example is a yes/no question"""
    yesno_bias: float = 0.35
    """stage 2 curriculum: P(yes) starts at 0.5 +- this (by image class half) and decays to 0.5"""
    yesno_bias_until: float = 0.0
    """stage 2 curriculum: fraction of the steps after which yes/no answers are balanced"""
    caption_weight: float = 4.0
    """stage 2: loss weight of a caption example (its loss is averaged over ~10 tokens, most of
    them template words, so the class word needs the extra weight)"""
    yesno_weight: float = 2.0
    """stage 2: loss weight of a yes/no example relative to the others"""
    mc_weight: float = 2.0
    """stage 2: loss weight of a multiple-choice example relative to the others"""
    p_text_yesno: float = 0.5
    """stages 1b and 2: fraction of text-only rows that are yes/no questions about a caption given
    as text (the rest: multiple choice, then half forced choices about it, half plain caption
    language modelling)"""
    p_text_multiple_choice: float = 0.25
    """stage 2: fraction of text-only rows that are lettered multiple choice about a caption"""
    text_weight: float = 0.3
    """stage 2: weight of the text-only caption loss"""
    train_tower: bool = True
    """stage 2: keep training the vision tower (at tower_lr_scale x lr); costs ~15 % per step"""
    tower_lr_scale: float = 0.3
    """stage 2: learning-rate multiplier of the vision tower"""
    init_from: Path | None = None
    """start stage 2 from this saved toy model instead of a fresh one (skips stage 1)"""
    log_every: int = 50
    """stage 2: every this many steps, print teacher-forced held-out accuracies of the answer word"""
    n_eval_per_class: int = 16
    """held-out images per class for the final accuracies"""
    threads: int = 2
    """torch CPU threads"""

    def __post_init__(self) -> None:
        if self.tiny:
            self.model = ToyModelConfig(
                vision_hidden=32,
                vision_layers=1,
                vision_heads=2,
                vision_intermediate=64,
                text_hidden=32,
                text_layers=2,
                text_heads=2,
                text_kv_heads=1,
                text_intermediate=64,
            )
            self.n_images, self.pretrain_steps, self.steps = 64, 10, 120
            self.pretrain_batch_size, self.batch_size, self.text_batch_size = 16, 8, 4
            self.n_eval_per_class = 1
        probabilities = (self.p_caption, self.p_forced_choice, self.p_multiple_choice, self.p_text_yesno,
                         self.p_text_multiple_choice)
        if min(probabilities) < 0 or self.p_caption + self.p_forced_choice + self.p_multiple_choice > 1:
            raise UserError("--p-caption, --p-forced-choice, --p-multiple-choice must be >= 0 and sum to at most 1")
        if self.p_text_yesno + self.p_text_multiple_choice > 1:
            raise UserError("--p-text-yesno + --p-text-multiple-choice must be at most 1")
        if self.image_size % self.model.tile_size:
            raise UserError(f"--image-size {self.image_size} must be a multiple of --model.tile-size "
                            f"{self.model.tile_size}")
        if min(self.n_images, self.steps, self.batch_size, self.pretrain_batch_size, self.n_eval_per_class,
               self.threads) < 1:
            raise UserError("--n-images, --steps, --batch-size, --pretrain-batch-size, --n-eval-per-class and "
                            "--threads must be positive")


# ---------------------------------------------------------------------------------------------
# The toy model builders: word-level tokenizer, LlavaNextProcessor, LlavaNextForConditionalGeneration
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]")
IMAGE_TOKEN = "<image>"
_EXTRA_WORDS = "yes no"

# The Mistral-style llava-v1.6 template: images first, then text; no BOS (the tokenizer adds it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] + eos_token }}{%- else -%}"
    "{{ ' ' + message['content'][0]['text'] + eos_token }}{%- endif -%}"
    "{%- else -%}{{ raise_exception('Only user and assistant roles are supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _pre_tokenizer() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def toy_vocabulary() -> list[str]:
    """Special tokens, then every word of the world's captions, questions (multiple choice included), answers
    and the steering prompt."""
    texts = [
        " ".join(CLASSES + COLOURS + SIZES + BACKGROUNDS),
        caption_for("circle", "red", "small", "dark"),
        CAPTION_QUESTION,
        FORCED_CHOICE_TEMPLATE.format(a="circle", b="square"),
        YESNO_TEMPLATE.format(name="circle"),
        COLOUR_YESNO_TEMPLATE.format(colour="red"),
        *(multiple_choice(question, options) for question, lists in MC_SUBJECTS.values() for options in lists),
        " ".join(MC_LETTERS),  # every option letter, as its lowercase word
        _EXTRA_WORDS,
    ]
    pre = _pre_tokenizer()
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text.lower())}
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lowercasing tokenizer; BOS prepended; decodes to space-joined words."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<image>", "[INST]", "[/INST]"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def pinpoints(tile_size: int) -> list[list[int]]:
    """anyres grid: one tile, two tiles either way, or 2x2 tiles."""
    t = tile_size
    return [[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]]


def build_toy_processor(tile_size: int = 32, patch_size: int = 8) -> LlavaNextProcessor:
    """``LlavaNextProcessor`` matching a toy tower of ``tile_size`` px tiles and ``patch_size`` px patches."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile_size},
        crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=pinpoints(tile_size),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_toy_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        # The CLS token the tower adds; without it the processor's count is one short for "default".
        num_additional_image_tokens=1,
    )


def build_toy_model(cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """Randomly initialised toy ``LlavaNextForConditionalGeneration`` (float32, eval mode)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.tile_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=cfg.text_hidden // cfg.text_heads,
        max_position_embeddings=1024,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=cfg.vision_feature_layer,
        image_grid_pinpoints=pinpoints(cfg.tile_size),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    gen.do_sample = False
    return model


# ---------------------------------------------------------------------------------------------
# Data: images rendered in memory, preprocessed once by the real image processor
# ---------------------------------------------------------------------------------------------

Row = tuple[list[int], list[int], float]
"""A training row: prompt ids, answer ids (the loss is taken on these), weight."""


@dataclasses.dataclass
class TrainData:
    """The training images in processed anyres form, their labels, and the token ids of prompts and answers."""

    processor: Any
    samples: list[ToySample]
    pixels_NPCHW: Any
    """processed pixels: N images x (base tile + grid tiles) x C x H x W"""
    sizes_N2: Any
    """original image sizes, as the processor reports them"""
    attrs: dict[str, Any]
    """``cls``, ``colour``, ``size``, ``background``: index tensors of shape [N]"""
    coverage_NP1hw: Any
    """fraction of each vision patch covered by the shape (see :func:`shape_coverage`)"""
    grid: tuple[int, int]
    """anyres tile rows, cols"""
    n_image_tokens: int
    """``<image>`` tokens per image after the processor's expansion"""
    _prompts: dict[tuple[str, bool], list[int]] = dataclasses.field(default_factory=dict)
    _answers: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def tok(self) -> Any:
        return self.processor.tokenizer

    def prompt_ids(self, question: str, image: bool = True) -> list[int]:
        """Token ids of ``question`` in the chat format, ``<image>`` expanded as the processor does."""
        from lineofsight.models import format_prompt

        key = (question, image)
        if key not in self._prompts:
            text = format_prompt(self.processor, question, image=image)
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)
            self._prompts[key] = self.tok(text)["input_ids"]
        return self._prompts[key]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of ``answer`` followed by EOS."""
        if answer not in self._answers:
            self._answers[answer] = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return self._answers[answer]

    def collate(self, rows: list[Row]) -> tuple[Any, Any, Any, Any]:
        """Right-padded ids, mask, labels (-100 outside answers) and per-row weights."""
        import torch

        length = max(len(p) + len(a) for p, a, _ in rows)
        ids = torch.full((len(rows), length), self.tok.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (p, a, _) in enumerate(rows):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[r, : len(p) + len(a)] = 1
        return ids, mask, labels, torch.tensor([w for _, _, w in rows])


def shape_coverage(masks: list[Any], image_size: int, tile: int, patch: int) -> Any:
    """Fraction of each vision patch covered by the shape, laid out like the processor's anyres
    pixels: ``[N, 1 + tiles, 1, tile // patch, tile // patch]``, the base tile (the whole image
    resized to one tile) first, then the tiles row by row."""
    import numpy as np
    import torch
    from torch import nn

    m = torch.tensor(np.stack(masks))[:, None]  # N, 1, H, W
    n_side = image_size // tile
    base = nn.functional.avg_pool2d(m, patch * n_side)[:, 0]
    fine = nn.functional.avg_pool2d(m, patch)[:, 0]
    per = tile // patch
    tiles = [fine[:, r * per : (r + 1) * per, c * per : (c + 1) * per] for r in range(n_side) for c in range(n_side)]
    return torch.stack([base, *tiles], 1)[:, :, None]


def prepare_data(cfg: Config, processor: Any, model: Any) -> TrainData:
    """Render ``n_images`` training images (world stream "train"), preprocess them once, and check
    that the hand-built prompt ids agree with the processor's."""
    import torch
    from transformers.image_processing_utils import select_best_resolution

    from lineofsight.models import format_prompt

    samples = [render_sample(cfg.seed, "train", i, cfg.image_size) for i in range(cfg.n_images)]
    enc = processor.image_processor([s.image for s in samples], return_tensors="pt")
    pixels_NPCHW, sizes_N2 = enc["pixel_values"], enc["image_sizes"]
    attrs = {
        "cls": torch.tensor([CLASSES.index(s.cls) for s in samples]),
        "colour": torch.tensor([COLOURS.index(s.colour) for s in samples]),
        "size": torch.tensor([SIZES.index(s.size) for s in samples]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in samples]),
    }
    coverage = shape_coverage([s.mask for s in samples], cfg.image_size, cfg.model.tile_size, cfg.model.patch_size)
    # The image-token count comes from the processor itself (all world images share one size).
    probe = processor(text=[format_prompt(processor, CAPTION_QUESTION)], images=[samples[0].image], return_tensors="pt")
    n_image_tokens = int((probe["input_ids"] == model.config.image_token_id).sum())
    if len({tuple(hw) for hw in sizes_N2.tolist()}) != 1:
        raise RuntimeError("training images must share one size")
    best_h, best_w = select_best_resolution(sizes_N2[0].tolist(), model.config.image_grid_pinpoints)
    grid = (best_h // cfg.model.tile_size, best_w // cfg.model.tile_size)
    print(
        f"{cfg.n_images} training images {tuple(pixels_NPCHW.shape[1:])} ({grid[0]}x{grid[1]} tiles + base), "
        f"{n_image_tokens} image tokens each"
    )
    data = TrainData(processor, samples, pixels_NPCHW, sizes_N2, attrs, coverage, grid, n_image_tokens)
    if data.prompt_ids(CAPTION_QUESTION) != probe["input_ids"][0].tolist():
        raise RuntimeError("hand-built prompt ids disagree with the processor's")
    return data


def hflip_tiles(pixels_BPCHW: Any, flip_B: Any, grid: tuple[int, int]) -> Any:
    """Mirror images left-right in processed anyres form: every tile is mirrored and the tile columns
    reversed (the base tile, index 0, stays first). Every world class is left-right symmetric up to
    the tilt the generator already randomises, so captions and answers stay correct."""
    import torch

    rows, cols = grid
    perm = [0] + [1 + r * cols + (cols - 1 - c) for r in range(rows) for c in range(cols)]
    flipped = pixels_BPCHW[:, perm].flip(-1)
    return torch.where(flip_B[:, None, None, None, None], flipped, pixels_BPCHW)


# ---------------------------------------------------------------------------------------------
# Examples: every random choice draws from the one numpy stream ``rng``, in a fixed order
# ---------------------------------------------------------------------------------------------


def curriculum_bias(cfg: Config, progress: float) -> float:
    """The yes/no bias of stage 2 at ``progress`` in [0, 1] (0 unless --yesno-bias-until)."""
    if not cfg.yesno_bias_until:
        return 0.0
    return cfg.yesno_bias * max(0.0, 1 - progress / cfg.yesno_bias_until)


def ask(rng: np.random.Generator, names: tuple[str, ...], true: str, bias: float) -> tuple[str, bool]:
    """(name asked about, whether it is the true one) for a yes/no question.

    With bias 0: yes half the time, otherwise a uniformly drawn other name. With bias b > 0
    (the curriculum's early steps), items of the first half of ``names`` get P(yes) = 0.5 + b
    and the others 0.5 - b, and "no" questions prefer names of the second half. The answer
    then also depends on the image and on the question word *separately*, which a small model
    picks up at once; from there it learns the comparison. Without it, yes/no stays at
    chance for the whole budget (the loss only rewards the product of both signals).
    """
    import numpy as np

    first_half = names.index(true) < len(names) // 2
    if rng.random() < 0.5 + (bias if first_half else -bias):
        return true, True
    others = [n for n in names if n != true]
    w = np.array([0.5 - bias if names.index(n) < len(names) // 2 else 0.5 + bias for n in others])
    return others[int(rng.choice(len(others), p=w / w.sum()))], False


def _other_class(rng: np.random.Generator, sample: ToySample) -> str:
    """A uniformly drawn class other than the sample's."""
    return CLASSES[(sample.label + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)]


def _mc_subject(rng: np.random.Generator) -> str:
    """A uniformly drawn multiple-choice subject."""
    subjects = list(MC_SUBJECTS)
    return subjects[int(rng.integers(len(subjects)))]


def image_example(cfg: Config, data: TrainData, rng: np.random.Generator, i: int, progress: float) -> Row:
    """A row of a random task about training image i (caption, forced choice, lettered multiple
    choice about the shape or the colour, class or colour yes/no); ``progress`` in [0, 1] drives
    the curriculum."""
    s = data.samples[i]
    u = rng.random() if progress >= cfg.yesno_only_until else 1.0
    if u < cfg.p_caption:
        question, answer, weight = CAPTION_QUESTION, s.caption, cfg.caption_weight
    elif u < cfg.p_caption + cfg.p_forced_choice:
        other = _other_class(rng, s)
        a, b = (s.cls, other) if rng.random() < 0.5 else (other, s.cls)
        question, answer, weight = FORCED_CHOICE_TEMPLATE.format(a=a, b=b), s.cls, 1.0
    elif u < cfg.p_caption + cfg.p_forced_choice + cfg.p_multiple_choice:
        item = mc_item(s, _mc_subject(rng))
        question, answer, weight = item.prompt, item.letter, cfg.mc_weight
    else:
        bias = curriculum_bias(cfg, progress)
        if rng.random() < cfg.p_colour_question:
            colour, yes = ask(rng, COLOURS, s.colour, bias)
            question = COLOUR_YESNO_TEMPLATE.format(colour=colour)
        else:
            name, yes = ask(rng, CLASSES, s.cls, bias)
            question = YESNO_TEMPLATE.format(name=name)
        answer, weight = "yes" if yes else "no", cfg.yesno_weight
    return data.prompt_ids(question), data.answer_ids(answer), weight


def text_example(cfg: Config, data: TrainData, rng: np.random.Generator, i: int, bias: float, eos: bool = True,
                 multiple_choice: bool = True) -> Row:
    """A text-only row about training image i's caption, which stands in for the image.

    A yes/no question (probability ``p_text_yesno``), a lettered multiple choice (probability
    ``p_text_multiple_choice``), else half the time a forced choice, else plain caption language
    modelling. Up to ``max_filler`` "." tokens between caption and
    question move the class word around, so the model finds it by content, as it must for
    image tokens, rather than at a fixed offset. ``eos=False`` drops the EOS target of the
    questions (the loss is then on the answer word alone). ``multiple_choice=False`` (stage 1b) leaves the
    lettered rows out: stage 1b is for the yes/no comparison, whose sudden learning they made a matter of luck
    (a retrain with them stayed at chance on yes/no).
    """
    s = data.samples[i]
    filler = " ." * int(rng.integers(cfg.max_filler + 1))
    u = rng.random()
    p_yesno, p_mc = cfg.p_text_yesno, cfg.p_text_multiple_choice if multiple_choice else 0.0
    if u < p_yesno:
        name, yes = ask(rng, CLASSES, s.cls, bias)
        prompt = data.prompt_ids(s.caption + filler + " " + YESNO_TEMPLATE.format(name=name), image=False)
        answer = data.answer_ids("yes" if yes else "no")
    elif u < p_yesno + p_mc:
        item = mc_item(s, _mc_subject(rng))
        prompt = data.prompt_ids(s.caption + filler + " " + item.prompt, image=False)
        answer = data.answer_ids(item.letter)
    elif u < p_yesno + p_mc + (1 - p_yesno - p_mc) / 2:
        other = _other_class(rng, s)
        a, b = (s.cls, other) if rng.random() < 0.5 else (other, s.cls)
        prompt = data.prompt_ids(s.caption + filler + " " + FORCED_CHOICE_TEMPLATE.format(a=a, b=b), image=False)
        answer = data.answer_ids(s.cls)
    else:
        return [data.tok.bos_token_id], data.answer_ids(s.caption), 1.0
    return prompt, answer if eos else answer[:-1], 1.0


def row_loss(logits_BTV: Any, labels_BT: Any, weight_B: Any) -> Any:
    """Next-token CE averaged per row over its answer tokens, then weight-averaged over rows."""
    from torch import nn

    logits_BTV, labels_BT = logits_BTV[:, :-1], labels_BT[:, 1:]
    ce_BT = nn.functional.cross_entropy(logits_BTV.transpose(1, 2), labels_BT, ignore_index=-100, reduction="none")
    n_B = (labels_BT != -100).sum(1).clamp(min=1)
    per_row_B = ce_BT.sum(1) / n_B
    return (per_row_B * weight_B).sum() / weight_B.sum()


def _lr_factor(step: int, n_steps: int, warmup_frac: float) -> float:
    warmup = max(1, int(warmup_frac * n_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Stage 1: vision pre-training
# ---------------------------------------------------------------------------------------------


def pretrain_vision(cfg: Config, model: Any, data: TrainData, gen: torch.Generator) -> tuple[dict[str, float], nn.Module]:
    """Stage 1: the tower and the projector learn shape, colour, size and background.

    Two readouts per attribute, summed:

    * **max**: a linear head on the max over all patch tokens of all tiles of the hidden state the
      projector reads. Max pooling sends the gradient to the tokens on the shape, so the tower
      learns shape features fast; mean pooling drowns them in background tokens and stays near
      chance for the whole budget.
    * **mean**: the mean over tokens of ``RMSNorm(projector(token))`` (what a freshly initialised
      language model sees through near-uniform attention after its first RMSNorm) scored against
      the language model's own (frozen) input embeddings of the attribute words, e.g. of
      "circle", ..., "ring". The image tokens then read, on average, like the words of their
      caption (LLaVA's stage-1 alignment in miniature): the language model gets a first-order
      signal from the image, and what it learns about class words in text carries over. With a
      random projector it learns the text prior and ignores the image for the whole run.

    * **dense**: a linear head on every projected patch token names the class of the shape the
      patch lies on (or "background" when the shape covers under 30 % of it). Each shape token
      then carries the class itself, so the *mean* image-token residual is linearly decodable
      (what the probes measure) even for small shapes that cover a few patches.

    Returns held-in accuracies of both readouts over the last 10 % of steps, and the dense head
    (stage 2 keeps training it, so the per-patch class information survives the VLM training).
    With ``--init-from`` stage 1 is skipped: no accuracies, and a freshly initialised dense head.
    """
    import torch
    from torch import nn
    from tqdm import tqdm

    t1 = time.time()
    # Drawn from the global torch RNG before stage 1 in either case: with --init-from it is stage
    # 2's dense head; otherwise it is discarded, but the draw keeps retraining bit-identical.
    fresh_dense_head = nn.Linear(cfg.model.text_hidden, len(CLASSES) + 1)
    if cfg.init_from is not None:
        return {}, fresh_dense_head
    tok = data.tok
    word_ids = {key: tok.convert_tokens_to_ids(list(words))
                for key, words in (("cls", CLASSES), ("colour", COLOURS), ("size", SIZES), ("background", BACKGROUNDS))}
    pixels_NPCHW, attrs, coverage_NP1hw, grid = data.pixels_NPCHW, data.attrs, data.coverage_NP1hw, data.grid

    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    d, d_text = cfg.model.vision_hidden, cfg.model.text_hidden
    n_classes = {"cls": len(CLASSES), "colour": len(COLOURS), "size": len(SIZES), "background": len(BACKGROUNDS)}
    max_heads = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n)) for k, n in n_classes.items()})
    mean_norm = nn.RMSNorm(d_text, eps=1e-6)
    dense_head = nn.Linear(d_text, len(CLASSES) + 1)
    embed_VH = model.get_input_embeddings().weight.detach()
    word_scale = nn.Parameter(torch.tensor(1.0 / embed_VH.std().item() / d_text**0.5))
    modules = [tower, projector, max_heads, mean_norm, dense_head]
    params = [p for m in modules for p in m.parameters()] + [word_scale]
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.pretrain_steps, cfg.warmup_frac))
    tower.train()
    n = pixels_NPCHW.shape[0]
    hits: dict[str, list[float]] = {"max": [], "mean": []}
    bar = tqdm(range(cfg.pretrain_steps), desc="stage 1: vision", file=sys.stdout, mininterval=10)
    for step in bar:
        idx = torch.randint(n, (cfg.pretrain_batch_size,), generator=gen)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        pix = hflip_tiles(pixels_NPCHW[idx], flip, grid).flatten(0, 1)
        hidden = tower(pix, output_hidden_states=True).hidden_states[cfg.model.vision_feature_layer][:, 1:]
        projected = projector(hidden)
        max_BD = hidden.reshape(len(idx), -1, d).amax(1)
        mean_BH = mean_norm(projected).reshape(len(idx), -1, d_text).mean(1)
        on_shape = hflip_tiles(coverage_NP1hw[idx], flip, grid).reshape(len(idx), -1) > 0.3
        patch_label = torch.where(on_shape, attrs["cls"][idx][:, None], len(CLASSES)).reshape(-1)
        loss = cfg.dense_weight * nn.functional.cross_entropy(dense_head(projected.reshape(-1, d_text)), patch_label)
        for key in n_classes:
            word_logits = word_scale * mean_BH @ embed_VH[word_ids[key]].T
            for name, logits in (("max", max_heads[key](max_BD)), ("mean", word_logits)):
                loss = loss + nn.functional.cross_entropy(logits, attrs[key][idx])
                if key == "cls" and step >= 0.9 * cfg.pretrain_steps:
                    hits[name].append((logits.argmax(-1) == attrs[key][idx]).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    acc = {k: sum(v) / max(1, len(v)) for k, v in hits.items()}
    print(
        f"stage 1 done in {time.time() - t1:.0f} s: train-batch class accuracy "
        f"max-pooled {acc['max']:.3f}, mean of projected tokens {acc['mean']:.3f}"
    )
    return acc, dense_head


# ---------------------------------------------------------------------------------------------
# Stage 1b: the comparison, learnt in text
# ---------------------------------------------------------------------------------------------


def train_text_yesno(cfg: Config, model: Any, data: TrainData, rng: np.random.Generator,
                     gen: torch.Generator) -> float | None:
    """Stage 1b: yes/no questions about a caption given as text; returns the last rows' accuracy.

    "Is there a <class> in this image?" needs the product of two signals (the question word and
    what is shown); a small LM finds that slowly among 100 image tokens, fast in a short text
    context. A caption stands in for the image here; stage 2 then only has to feed the
    comparison it learnt from the image, which is a first-order problem.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    if not cfg.text_steps:
        return None
    t1b = time.time()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    model.train()
    bar = tqdm(range(cfg.text_steps), desc="stage 1b: text yes/no", file=sys.stdout, mininterval=10)
    text_hits: list[bool] = []
    yes_no_ids = set(data.tok.convert_tokens_to_ids(["yes", "no"]))
    for step in bar:
        bias = cfg.yesno_bias * max(0.0, 1 - 2 * step / cfg.text_steps)  # balanced for the second half
        idx = torch.randint(len(data.samples), (cfg.batch_size,), generator=gen).tolist()
        rows = [text_example(cfg, data, rng, i, bias, eos=False, multiple_choice=False) for i in idx]
        ids, mask, labels, weight = data.collate(rows)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = row_loss(logits, labels, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yes_no = [r for r, row in enumerate(rows) if len(row[1]) == 1 and row[1][0] in yes_no_ids]
        first = [len(rows[r][0]) for r in yes_no]
        text_hits += (logits[yes_no, [f - 1 for f in first]].argmax(-1) == labels[yes_no, first]).tolist()
    acc = float(np.mean(text_hits[-200:]))
    print(f"stage 1b done in {time.time() - t1b:.0f} s: text yes/no accuracy {acc:.3f}")
    return acc


# ---------------------------------------------------------------------------------------------
# Stage 2: VLM training
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProbeBatch:
    """A fixed held-out batch for quick teacher-forced progress numbers (first answer word only)."""

    ids: Any
    mask: Any
    labels: Any
    pixel_values: Any
    image_sizes: Any
    tasks: list[str]
    """per row: caption-class, choice, yes, no or mc"""


def heldout_probe(cfg: Config, data: TrainData) -> ProbeBatch:
    """Five questions about each of 32 held-out images (seed + 1: not the final evaluation's)."""

    samples = heldout_samples(4, seed=cfg.seed + 1, image_size=cfg.image_size)
    pixels = data.processor.image_processor([s.image for s in samples], return_tensors="pt")
    rows, tasks, images = [], [], []
    for k, s in enumerate(samples):
        other = CLASSES[(s.label + 1 + k % (len(CLASSES) - 1)) % len(CLASSES)]
        item = mc_item(s, list(MC_SUBJECTS)[k % len(MC_SUBJECTS)])
        for task, (q, a) in {
            "caption-class": (CAPTION_QUESTION, s.caption),
            "choice": (FORCED_CHOICE_TEMPLATE.format(a=other, b=s.cls), s.cls),
            "yes": (YESNO_TEMPLATE.format(name=s.cls), "yes"),
            "no": (YESNO_TEMPLATE.format(name=other), "no"),
            "mc": (item.prompt, item.letter),
        }.items():
            rows.append((data.prompt_ids(q), data.answer_ids(a), 1.0))
            tasks.append(task)
            images.append(k)
    ids, mask, labels, _ = data.collate(rows)
    return ProbeBatch(ids, mask, labels, pixels["pixel_values"][images], pixels["image_sizes"][images], tasks)


def probe_accuracy(model: Any, probe: ProbeBatch) -> dict[str, float]:
    """Teacher-forced accuracy of the first answer word (of the class word for captions) per task."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = model(input_ids=probe.ids, attention_mask=probe.mask, pixel_values=probe.pixel_values,
                       image_sizes=probe.image_sizes).logits
    hits: dict[str, list[bool]] = {}
    for r, task in enumerate(probe.tasks):
        pos = int((probe.labels[r] != -100).nonzero()[0])  # first answer token
        if task == "caption-class":
            pos += 3  # "a <size> <colour> <class>"
        hits.setdefault(task.split("-")[0] if task != "no" else "yes", []).append(
            bool(logits[r, pos - 1].argmax() == probe.labels[r, pos])
        )
    return {k: float(np.mean(v)) for k, v in hits.items()}


def train_vlm(cfg: Config, model: Any, data: TrainData, dense_head: nn.Module, rng: np.random.Generator,
              gen: torch.Generator) -> list[float]:
    """Stage 2: image rows (captions, forced choices, yes/no) + the per-patch class loss on the
    projected image tokens + text-only rows; returns the loss of every step."""
    import numpy as np
    import torch
    from torch import nn
    from tqdm import tqdm

    t2 = time.time()
    probe = heldout_probe(cfg, data)
    tower = model.model.vision_tower
    tower.requires_grad_(cfg.train_tower)
    tower_ids = {id(p) for p in tower.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in tower_ids], "lr": cfg.lr},
        {"params": [p for p in tower.parameters() if p.requires_grad], "lr": cfg.lr * cfg.tower_lr_scale},
    ]
    if cfg.dense_weight_vlm:
        groups.append({"params": list(dense_head.parameters()), "lr": cfg.lr})
    params = [p for g in groups for p in g["params"]]
    projected: list[Any] = []
    capture = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: projected.append(out))
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, cfg.warmup_frac))
    model.train()
    tower.train(cfg.train_tower)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="stage 2: VLM", file=sys.stdout, mininterval=5)
    try:
        for step in bar:
            progress = step / max(1, cfg.steps)
            idx = torch.randint(len(data.samples), (cfg.batch_size,), generator=gen).tolist()
            rows = [image_example(cfg, data, rng, i, progress) for i in idx]
            ids, mask, labels, weight = data.collate(rows)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            pixels = hflip_tiles(data.pixels_NPCHW[idx], flip, data.grid)
            projected.clear()
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                           image_sizes=data.sizes_N2[idx]).logits
            loss = row_loss(logits, labels, weight)
            if cfg.dense_weight_vlm:
                on_shape = hflip_tiles(data.coverage_NP1hw[idx], flip, data.grid).reshape(len(idx), -1) > 0.3
                patch_label = torch.where(on_shape, data.attrs["cls"][idx][:, None], len(CLASSES)).reshape(-1)
                patch_logits = dense_head(projected[0].reshape(-1, cfg.model.text_hidden))
                loss = loss + cfg.dense_weight_vlm * nn.functional.cross_entropy(patch_logits, patch_label)
            if cfg.text_batch_size:
                text_idx = torch.randint(len(data.samples), (cfg.text_batch_size,), generator=gen).tolist()
                text_rows = [text_example(cfg, data, rng, i, curriculum_bias(cfg, progress)) for i in text_idx]
                t_ids, t_mask, t_labels, t_weight = data.collate(text_rows)
                t_logits = model(input_ids=t_ids, attention_mask=t_mask).logits
                loss = loss + cfg.text_weight * row_loss(t_logits, t_labels, t_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                model.eval()
                acc = probe_accuracy(model, probe)
                model.train()
                tower.train(cfg.train_tower)
                bar.write(f"step {step + 1}: loss {np.mean(losses[-cfg.log_every:]):.3f}  held-out first-word "
                          "accuracy " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    finally:
        capture.remove()
    model.eval()
    model.requires_grad_(True)
    print(f"stage 2 done in {time.time() - t2:.0f} s: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
    return losses


# ---------------------------------------------------------------------------------------------
# Held-out evaluation, save
# ---------------------------------------------------------------------------------------------


def evaluate_heldout(cfg: Config, model: Any, processor: Any) -> dict[str, Any]:
    """Accuracies on fresh held-out images (a stream training never sees), and a few generations, printed."""
    t3 = time.time()
    heldout = heldout_samples(cfg.n_eval_per_class, seed=cfg.seed, image_size=cfg.image_size)
    metrics = evaluate_toy(model, processor, heldout, batch_size=64, seed=cfg.seed)
    print(
        f"held-out ({metrics['n_images']} images, {time.time() - t3:.0f} s): "
        f"caption {metrics['caption_acc']:.3f}  forced choice {metrics['forced_choice_acc']:.3f}  "
        f"yes/no {metrics['yesno_acc']:.3f}  "
        + "  ".join(f"multiple choice ({s}) {metrics[mc_task(s) + '_acc']:.3f}" for s in MC_SUBJECTS)
    )
    for task, question, answer, expected in metrics["examples"]:
        print(f"  [{task}] {question!r} -> {answer!r} (expected {expected!r})")
    return metrics


def save_model(model: Any, processor: Any, out: Path) -> float:
    """``save_pretrained`` of the model and the processor into ``out``, file by file atomically;
    returns the size in MB.

    Everything is first written to a hidden temporary folder inside ``out`` (``.save-*.tmp``, which
    the run lifecycle recognises as the project's) and then renamed over the final names, so a
    reader never sees a half-written file and a killed save leaves only the temporary folder.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".save-", suffix=".tmp", dir=out))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        undeclared = [name for name in written if not any(fnmatch.fnmatch(name, p) for p in MODEL_FILES)]
        if undeclared:  # --overwrite removes only declared files: keep MODEL_FILES complete
            raise RuntimeError(f"save_pretrained wrote files missing from MODEL_FILES: {undeclared}")
        for name in written:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum((out / name).stat().st_size for name in written) / 1e6


def build_or_load(cfg: Config) -> tuple[Any, Any]:
    """The toy processor, and a fresh model (seeded) or the ``--init-from`` one."""
    from lineofsight.models import load_vlm

    processor = build_toy_processor(cfg.model.tile_size, cfg.model.patch_size)
    if cfg.init_from is not None:
        model, _ = load_vlm(str(cfg.init_from))
    else:
        model = build_toy_model(cfg.model, processor.tokenizer, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy LLaVA-NeXT: {n_params / 1e6:.2f} M parameters, vocabulary {len(processor.tokenizer)}")
    return processor, model


@lifecycle(SCRIPT, outputs=(*MODEL_FILES, TRAINING_RECORD))
def main(cfg: Config, run: Run) -> dict[str, Any]:
    t_start = time.time()
    run.setup(seed=cfg.seed, device="cpu")  # seeds the global torch RNG with --seed (the model init)
    import numpy as np
    import torch

    torch.set_num_threads(cfg.threads)
    processor, model = build_or_load(cfg)  # a bad --init-from fails here, before --out is touched
    run.open(cfg.out, overwrite=cfg.overwrite)
    rng = np.random.default_rng([cfg.seed, 1])  # every task / question / answer choice
    gen = torch.Generator().manual_seed(cfg.seed)  # batch indices and flips

    data = prepare_data(cfg, processor, model)
    pretrain_acc, dense_head = pretrain_vision(cfg, model, data, gen)
    text_acc = train_text_yesno(cfg, model, data, rng, gen)
    losses = train_vlm(cfg, model, data, dense_head, rng, gen)
    metrics = evaluate_heldout(cfg, model, processor)
    wall_s = time.time() - t_start

    assert run.out is not None
    size_mb = save_model(model, processor, run.out)
    record = {
        "metrics": {k: v for k, v in metrics.items() if k != "examples"},
        "stage1_class_acc": pretrain_acc,
        "stage1b_text_yesno_acc": text_acc,
        "final_loss": float(np.mean(losses[-10:])),
        "wall_s": round(wall_s, 1),
    }
    return run.finish(f"wrote {run.out} ({size_mb:.1f} MB) in {wall_s:.0f} s total", record, TRAINING_RECORD)


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
