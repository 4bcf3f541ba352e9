"""Train the toy LLaVA-NeXT on the shape world, from scratch, on CPU, in under 10 minutes.

Three stages, like LLaVA's pre-trained CLIP followed by visual instruction tuning:

1. **Vision pre-training** (about 160 s). The CLIP tower and the projector learn shape, colour,
   size and background (see :func:`pretrain_vision`: max-pooled attribute heads, a per-patch
   class head, and the mean projected image token aligned with the caption words' embeddings).
   Training the tower jointly with the language model from scratch stalls (about 60 % caption
   accuracy after 5 minutes); pre-training it does not.
1b. **Yes/no in text** (about 60 s). The language model learns to answer
   ``Is there a <class> in this image?`` about a caption given as text. Learnt from the image
   alone, the comparison of the question's word with what is shown stays at chance for the whole
   budget (the loss only rewards the product of two signals); in a short text context it is
   learnt in seconds, and stage 2 then only has to feed it what the image shows.
2. **VLM training** (about 310 s). The projector, ``image_newline``, the Mistral backbone and (at
   a lower learning rate) the tower learn captioning, the steering forced choice
   (``Reply either "a" or "b" ...`` -> class word), balanced yes/no questions (about the class or
   the colour) and text-only rows, with the per-patch class loss kept on the projected image
   tokens. The loss is taken on the answer tokens and EOS only, averaged per example.

At the end the held-out accuracies (fresh images from a stream training never sees) and a few
generations are printed, and the model + processor are saved with ``save_pretrained`` into a
temporary sibling of ``--out`` and renamed into place.

    python scripts/train_toy_vlm.py                   # writes data/toy/model (8 min 15 s on 2 cores, bit-identical weights)
    python scripts/train_toy_vlm.py --tiny --out /tmp/toy --overwrite   # seconds; for tests
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lineofsight.toy import TOY_MODEL_DIR, ToyModelConfig  # numpy + PIL only; keeps --help instant


@dataclasses.dataclass
class Config:
    out: Path = TOY_MODEL_DIR
    """folder the trained model + processor are written to (atomically: temp sibling, then rename)"""
    overwrite: bool = False
    """replace --out if it already exists"""
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
    steps: int = 750
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
    p_forced_choice: float = 0.2
    """stage 2: probability an image example is a forced choice (the rest are yes/no)"""
    p_colour_question: float = 0.25
    """stage 2: fraction of yes/no examples that ask about the colour instead of the class"""
    text_steps: int = 400
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
    p_text_yesno: float = 0.5
    """stages 1b and 2: fraction of text-only rows that are yes/no questions about a caption given
    as text (the rest: half forced choices about it, half plain caption language modelling)"""
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
        if not 0 <= self.p_caption + self.p_forced_choice <= 1:
            raise ValueError("p_caption + p_forced_choice must be in [0, 1]")
        if self.image_size % self.model.tile_size:
            raise ValueError("image_size must be a multiple of model.tile_size")


def _lr_factor(step: int, n_steps: int, warmup_frac: float) -> float:
    warmup = max(1, int(warmup_frac * n_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def hflip_tiles(pixels_BPCHW: Any, flip_B: Any, grid: tuple[int, int]) -> Any:
    """Mirror images left-right in processed anyres form: every tile is mirrored and the tile columns
    reversed (the base tile, index 0, stays first). Every world class is left-right symmetric up to
    the tilt the generator already randomises, so captions and answers stay correct."""
    import torch

    rows, cols = grid
    perm = [0] + [1 + r * cols + (cols - 1 - c) for r in range(rows) for c in range(cols)]
    flipped = pixels_BPCHW[:, perm].flip(-1)
    return torch.where(flip_B[:, None, None, None, None], flipped, pixels_BPCHW)


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


def pretrain_vision(
    cfg: Config,
    model: Any,
    pixels_NPCHW: Any,
    attrs: dict[str, Any],
    word_ids: dict[str, list[int]],
    coverage_NP1hw: Any,
    grid: tuple[int, int],
    gen: Any,
) -> tuple[dict[str, float], Any]:
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
    """
    import torch
    from torch import nn
    from tqdm import tqdm

    from lineofsight.toy import BACKGROUNDS, CLASSES, COLOURS, SIZES

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
    return {k: sum(v) / max(1, len(v)) for k, v in hits.items()}, dense_head


def main(cfg: Config) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn
    from tqdm import tqdm
    from transformers import __version__ as transformers_version
    from transformers.image_processing_utils import select_best_resolution

    from lineofsight import toy

    t_start = time.time()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    gen = torch.Generator().manual_seed(cfg.seed)

    processor = toy.build_toy_processor(cfg.model.tile_size, cfg.model.patch_size)
    tok = processor.tokenizer
    if cfg.init_from is not None:
        model, _ = toy.load_toy(cfg.init_from)
    else:
        model = toy.build_toy_model(cfg.model, tok, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy LLaVA-NeXT: {n_params / 1e6:.2f} M parameters, vocabulary {len(tok)}")

    # ---- data: images rendered in memory, preprocessed once by the real image processor ----
    samples = [toy.render_sample(cfg.seed, "train", i, cfg.image_size) for i in range(cfg.n_images)]
    enc = processor.image_processor([s.image for s in samples], return_tensors="pt")
    pixels_NPCHW, sizes_N2 = enc["pixel_values"], enc["image_sizes"]
    attrs = {
        "cls": torch.tensor([toy.CLASSES.index(s.cls) for s in samples]),
        "colour": torch.tensor([toy.COLOURS.index(s.colour) for s in samples]),
        "size": torch.tensor([toy.SIZES.index(s.size) for s in samples]),
        "background": torch.tensor([toy.BACKGROUNDS.index(s.background) for s in samples]),
    }
    coverage = shape_coverage([s.mask for s in samples], cfg.image_size, cfg.model.tile_size, cfg.model.patch_size)
    # The image-token count comes from the processor itself (all world images share one size).
    probe_prompt = toy.chat_prompt(processor, toy.CAPTION_QUESTION)
    probe = processor(text=[probe_prompt], images=[samples[0].image], return_tensors="pt")
    n_image_tokens = int((probe["input_ids"] == model.config.image_token_id).sum())
    if len({tuple(hw) for hw in sizes_N2.tolist()}) != 1:
        raise RuntimeError("training images must share one size")
    best_h, best_w = select_best_resolution(sizes_N2[0].tolist(), model.config.image_grid_pinpoints)
    grid = (best_h // cfg.model.tile_size, best_w // cfg.model.tile_size)  # anyres tile rows, cols
    print(
        f"{cfg.n_images} training images {tuple(pixels_NPCHW.shape[1:])} ({grid[0]}x{grid[1]} tiles + base), "
        f"{n_image_tokens} image tokens each"
    )

    prompt_cache: dict[tuple[str, bool], list[int]] = {}

    def prompt_ids(question: str, image: bool = True) -> list[int]:
        key = (question, image)
        if key not in prompt_cache:
            text = toy.chat_prompt(processor, question, image=image)
            text = text.replace(toy.IMAGE_TOKEN, toy.IMAGE_TOKEN * n_image_tokens)
            prompt_cache[key] = tok(text)["input_ids"]
        return prompt_cache[key]

    answer_cache: dict[str, list[int]] = {}

    def answer_ids(answer: str) -> list[int]:
        if answer not in answer_cache:
            answer_cache[answer] = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return answer_cache[answer]

    if prompt_ids(toy.CAPTION_QUESTION) != probe["input_ids"][0].tolist():
        raise RuntimeError("hand-built prompt ids disagree with the processor's")

    def curriculum_bias(progress: float) -> float:
        if not cfg.yesno_bias_until:
            return 0.0
        return cfg.yesno_bias * max(0.0, 1 - progress / cfg.yesno_bias_until)

    def ask(names: tuple[str, ...], true: str, bias: float) -> tuple[str, bool]:
        """(name asked about, whether it is the true one) for a yes/no question.

        With bias 0: yes half the time, otherwise a uniformly drawn other name. With bias b > 0
        (the curriculum's early steps), items of the first half of ``names`` get P(yes) = 0.5 + b
        and the others 0.5 - b, and "no" questions prefer names of the second half. The answer
        then also depends on the image and on the question word *separately*, which a small model
        picks up at once; from there it learns the comparison. Without it, yes/no stays at
        chance for the whole budget (the loss only rewards the product of both signals).
        """
        first_half = names.index(true) < len(names) // 2
        if rng.random() < 0.5 + (bias if first_half else -bias):
            return true, True
        others = [n for n in names if n != true]
        w = np.array([0.5 - bias if names.index(n) < len(names) // 2 else 0.5 + bias for n in others])
        return others[int(rng.choice(len(others), p=w / w.sum()))], False

    def example(i: int, progress: float) -> tuple[str, str, float]:
        """(question, answer, weight) of a random task for training image i; progress in [0, 1]."""
        s = samples[i]
        u = rng.random() if progress >= cfg.yesno_only_until else 1.0
        if u < cfg.p_caption:
            return toy.CAPTION_QUESTION, s.caption, cfg.caption_weight
        if u < cfg.p_caption + cfg.p_forced_choice:
            other = toy.CLASSES[(s.label + 1 + int(rng.integers(len(toy.CLASSES) - 1))) % len(toy.CLASSES)]
            src, tgt = (s.cls, other) if rng.random() < 0.5 else (other, s.cls)
            return toy.FORCED_CHOICE_TEMPLATE.format(src=src, tgt=tgt), s.cls, 1.0
        bias = curriculum_bias(progress)
        if rng.random() < cfg.p_colour_question:
            colour, yes = ask(toy.COLOURS, s.colour, bias)
            return toy.COLOUR_YESNO_TEMPLATE.format(colour=colour), "yes" if yes else "no", cfg.yesno_weight
        name, yes = ask(toy.CLASSES, s.cls, bias)
        return toy.YESNO_TEMPLATE.format(name=name), "yes" if yes else "no", cfg.yesno_weight

    def text_example(i: int, bias: float, p_yesno: float, eos: bool = True) -> tuple[list[int], list[int], float]:
        """A text-only row about training image i's caption, which stands in for the image.

        A yes/no question (probability ``p_yesno``), else half the time a forced choice, else
        plain caption language modelling. Up to ``max_filler`` "." tokens between caption and
        question move the class word around, so the model finds it by content, as it must for
        image tokens, rather than at a fixed offset. ``eos=False`` drops the EOS target of the
        questions (the loss is then on the answer word alone).
        """
        s = samples[i]
        filler = " ." * int(rng.integers(cfg.max_filler + 1))
        u = rng.random()
        if u < p_yesno:
            name, yes = ask(toy.CLASSES, s.cls, bias)
            prompt = prompt_ids(s.caption + filler + " " + toy.YESNO_TEMPLATE.format(name=name), image=False)
            answer = answer_ids("yes" if yes else "no")
        elif u < p_yesno + (1 - p_yesno) / 2:
            other = toy.CLASSES[(s.label + 1 + int(rng.integers(len(toy.CLASSES) - 1))) % len(toy.CLASSES)]
            src, tgt = (s.cls, other) if rng.random() < 0.5 else (other, s.cls)
            prompt = prompt_ids(s.caption + filler + " " + toy.FORCED_CHOICE_TEMPLATE.format(src=src, tgt=tgt), image=False)
            answer = answer_ids(s.cls)
        else:
            return [tok.bos_token_id], answer_ids(s.caption), 1.0
        return prompt, answer if eos else answer[:-1], 1.0

    def collate(rows: list[tuple[list[int], list[int], float]]) -> tuple[Any, Any, Any, Any]:
        """Right-padded ids, mask, labels (-100 outside answers) and per-row weights."""
        length = max(len(p) + len(a) for p, a, _ in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (p, a, _) in enumerate(rows):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[r, : len(p) + len(a)] = 1
        return ids, mask, labels, torch.tensor([w for _, _, w in rows])

    def row_loss(logits_BTV: Any, labels_BT: Any, weight_B: Any) -> Any:
        """Next-token CE averaged per row over its answer tokens, then weight-averaged over rows."""
        logits_BTV, labels_BT = logits_BTV[:, :-1], labels_BT[:, 1:]
        ce_BT = nn.functional.cross_entropy(
            logits_BTV.transpose(1, 2), labels_BT, ignore_index=-100, reduction="none"
        )
        n_B = (labels_BT != -100).sum(1).clamp(min=1)
        per_row_B = ce_BT.sum(1) / n_B
        return (per_row_B * weight_B).sum() / weight_B.sum()

    # ---- stage 1 ----
    t1 = time.time()
    pretrain_acc: dict[str, float] = {}
    dense_head = nn.Linear(cfg.model.text_hidden, len(toy.CLASSES) + 1)  # replaced by stage 1's
    if cfg.init_from is None:
        word_ids = {
            key: tok.convert_tokens_to_ids(list(words))
            for key, words in (
                ("cls", toy.CLASSES), ("colour", toy.COLOURS), ("size", toy.SIZES), ("background", toy.BACKGROUNDS)
            )
        }
        pretrain_acc, dense_head = pretrain_vision(cfg, model, pixels_NPCHW, attrs, word_ids, coverage, grid, gen)
        print(
            f"stage 1 done in {time.time() - t1:.0f} s: train-batch class accuracy "
            f"max-pooled {pretrain_acc['max']:.3f}, mean of projected tokens {pretrain_acc['mean']:.3f}"
        )

    # A fixed held-out batch for quick teacher-forced progress numbers (first answer word only).
    probe_samples = toy.heldout_samples(4, seed=cfg.seed + 1, image_size=cfg.image_size)
    probe_pixels = processor.image_processor([s.image for s in probe_samples], return_tensors="pt")
    probe_rows, probe_tasks = [], []
    for k, s in enumerate(probe_samples):
        other = toy.CLASSES[(s.label + 1 + k % (len(toy.CLASSES) - 1)) % len(toy.CLASSES)]
        for task, (q, a) in {
            "caption-class": (toy.CAPTION_QUESTION, s.caption),
            "choice": (toy.FORCED_CHOICE_TEMPLATE.format(src=other, tgt=s.cls), s.cls),
            "yes": (toy.YESNO_TEMPLATE.format(name=s.cls), "yes"),
            "no": (toy.YESNO_TEMPLATE.format(name=other), "no"),
        }.items():
            probe_rows.append((prompt_ids(q), answer_ids(a), 1.0))
            probe_tasks.append((task, k))

    def probe_accuracy() -> dict[str, float]:
        ids, mask, labels, _ = collate(probe_rows)
        img = [k for _, k in probe_tasks]
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=probe_pixels["pixel_values"][img],
                image_sizes=probe_pixels["image_sizes"][img],
            ).logits
        hits: dict[str, list[bool]] = {}
        for r, (task, _) in enumerate(probe_tasks):
            pos = int((labels[r] != -100).nonzero()[0])  # first answer token
            if task == "caption-class":
                pos += 3  # "a <size> <colour> <class>"
            hits.setdefault(task.split("-")[0] if task != "no" else "yes", []).append(
                bool(logits[r, pos - 1].argmax() == labels[r, pos])
            )
        return {k: float(np.mean(v)) for k, v in hits.items()}

    # ---- stage 1b: the comparison, learnt in text ----
    # "Is there a <class> in this image?" needs the product of two signals (the question word and
    # what is shown); a small LM finds that slowly among 100 image tokens, fast in a short text
    # context. A caption stands in for the image here; stage 2 then only has to feed the
    # comparison it learnt from the image, which is a first-order problem.
    t1b = time.time()
    if cfg.text_steps:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01
        )
        model.train()
        bar = tqdm(range(cfg.text_steps), desc="stage 1b: text yes/no", file=sys.stdout, mininterval=10)
        text_hits: list[bool] = []
        yes_no_ids = set(tok.convert_tokens_to_ids(["yes", "no"]))
        for step in bar:
            bias = cfg.yesno_bias * max(0.0, 1 - 2 * step / cfg.text_steps)  # balanced for the second half
            idx = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
            rows = [text_example(i, bias, cfg.p_text_yesno, eos=False) for i in idx]
            ids, mask, labels, weight = collate(rows)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = row_loss(logits, labels, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            yes_no = [r for r, row in enumerate(rows) if len(row[1]) == 1 and row[1][0] in yes_no_ids]
            first = [len(rows[r][0]) for r in yes_no]
            text_hits += (logits[yes_no, [f - 1 for f in first]].argmax(-1) == labels[yes_no, first]).tolist()
        print(f"stage 1b done in {time.time() - t1b:.0f} s: text yes/no accuracy {np.mean(text_hits[-200:]):.3f}")

    # ---- stage 2 ----
    t2 = time.time()
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
    model.model.vision_tower.train(cfg.train_tower)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="stage 2: VLM", file=sys.stdout, mininterval=5)
    for step in bar:
        idx = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
        rows = []
        for i in idx:
            question, answer, weight = example(i, step / max(1, cfg.steps))
            rows.append((prompt_ids(question), answer_ids(answer), weight))
        ids, mask, labels, weight = collate(rows)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        pixels = hflip_tiles(pixels_NPCHW[idx], flip, grid)
        projected.clear()
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes_N2[idx]).logits
        loss = row_loss(logits, labels, weight)
        if cfg.dense_weight_vlm:
            on_shape = hflip_tiles(coverage[idx], flip, grid).reshape(len(idx), -1) > 0.3
            patch_label = torch.where(on_shape, attrs["cls"][idx][:, None], len(toy.CLASSES)).reshape(-1)
            patch_logits = dense_head(projected[0].reshape(-1, cfg.model.text_hidden))
            loss = loss + cfg.dense_weight_vlm * nn.functional.cross_entropy(patch_logits, patch_label)
        if cfg.text_batch_size:
            text_idx = torch.randint(len(samples), (cfg.text_batch_size,), generator=gen).tolist()
            progress = step / max(1, cfg.steps)
            text_rows = [text_example(i, curriculum_bias(progress), cfg.p_text_yesno) for i in text_idx]
            t_ids, t_mask, t_labels, t_weight = collate(text_rows)
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
            acc = probe_accuracy()
            model.train()
            tower.train(cfg.train_tower)
            bar.write(f"step {step + 1}: loss {np.mean(losses[-cfg.log_every:]):.3f}  held-out first-word accuracy " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    capture.remove()
    model.eval()
    model.requires_grad_(True)
    print(f"stage 2 done in {time.time() - t2:.0f} s: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")

    # ---- evaluation on fresh held-out images ----
    t3 = time.time()
    heldout = toy.heldout_samples(cfg.n_eval_per_class, seed=cfg.seed, image_size=cfg.image_size)
    metrics = toy.evaluate_toy(model, processor, heldout, batch_size=64, seed=cfg.seed)
    print(
        f"held-out ({metrics['n_images']} images, {time.time() - t3:.0f} s): "
        f"caption {metrics['caption_acc']:.3f}  forced choice {metrics['forced_choice_acc']:.3f}  "
        f"yes/no {metrics['yesno_acc']:.3f}"
    )
    for task, question, answer, expected in metrics["examples"]:
        print(f"  [{task}] {question!r} -> {answer!r} (expected {expected!r})")

    # ---- save atomically ----
    wall_s = time.time() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record = {
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "metrics": {k: v for k, v in metrics.items() if k != "examples"},
            "stage1_class_acc": pretrain_acc,
            "final_loss": float(np.mean(losses[-10:])),
            "wall_s": round(wall_s, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers_version},
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            shutil.rmtree(trash)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB) in {wall_s:.0f} s total")
    return {
        "losses": losses,
        "stage1_class_acc": pretrain_acc,
        "metrics": metrics,
        "wall_s": wall_s,
        "out": out,
    }


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Config))
