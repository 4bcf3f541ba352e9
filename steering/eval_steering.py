"""Efficacy and damage of class steering vectors over the strength k, per layer.

- **Efficacy**: held-out images of ``src`` with the prompt ``Reply either "{src}" or "{tgt}" in
  lowercase depending on what is shown in the image. Do not output any other text.`` (the order of
  the two names alternates between images; spaced as in the paper's code, ``<image>\n Reply``:
  :data:`lineofsight.prompts.FORCED_CHOICE_TEMPLATE`); with ``k * v`` added at the image tokens of the
  layer, the probability that the model answers ``tgt`` (``p_tgt``) and ``src`` (``p_src``), and the flip
  rate (share of images where ``tgt`` is more likely than ``src``). ``--answer-scoring sequence`` (default)
  scores the whole name as the model writes it after the prompt (``exp`` of the summed log-probabilities
  of its tokens, teacher forced: most class names are several Mistral tokens); ``first-token`` the
  next-token probability of the name's first token alone (the paper's code read the last token instead).
- **Damage**: the increase in mean caption NLL (ShareGPT4V-format captions given the image and
  ``What is shown in this image?``) under the same intervention, ``NLL(k) - NLL(0)``, averaged
  over pairs.
- **Rollout score** (with ``--rollouts``): the share of steered rollouts that name ``tgt`` and the
  share that still name ``src``, per k (a cheap automatic proxy for the paper's human ratings).

Writes ``<out>/metrics.json`` (``metrics[layer][k]`` holds ``p_tgt``, ``p_src``, ``flip_rate``,
``damage_nll`` and, with rollouts, ``rollout_tgt``/``rollout_src``; ``answer_scoring`` says how ``p_tgt`` /
``p_src`` were scored) and plots ``efficacy.png``,
``damage.png`` (and ``rollouts.png``), one line per layer.

    python steering/eval_steering.py --vectors runs/vectors --layer 2 3 --out runs/steering_eval
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.metrics import NLL_CHUNK_TOKENS
from lineofsight.models import Dtype
from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle

OUTPUTS = ("metrics.json", "efficacy.png", "damage.png", "rollouts.png")


@dataclasses.dataclass
class Config:
    """Options for the steering evaluation."""

    vectors: Path
    """Folder written by steering/compute_steering_vectors.py."""
    layer: tuple[int, ...]
    """Layer(s) to evaluate: layer L = the input of decoder block L (= hidden_states[L]); must be among the vectors' layers."""
    model: str = "toy"
    """Model: 'toy', an HF id or a local directory (the one the vectors were computed on)."""
    imagenet_dir: Path = TOY_WORLD_DIR / "imagenet"
    """ImageNet-layout root; efficacy uses images of each pair's src class from --split."""
    split: str = "val"
    """Split with held-out source images."""
    data: Path = TOY_WORLD_DIR / "sharegpt4v.json"
    """ShareGPT4V-format JSON with the captions for the damage measurement."""
    image_root: Path | None = None
    """Folder the records' image paths are relative to (default: the JSON's folder)."""
    pairs: Path | None = None
    """File of src@tgt lines (default: every pair in the vectors)."""
    n_pairs: int | None = None
    """Use only the first N pairs."""
    k: tuple[float, ...] = ()
    """Strengths (default: the paper's linspace(0, 30, 20))."""
    images_per_pair: int = 10
    """Held-out src images per pair for efficacy."""
    n_captions: int = 32
    """Captions for the damage measurement."""
    positions: Literal["image", "prompt", "all"] = "image"
    """Where the vector is added (image tokens by default)."""
    rollouts: Path | None = None
    """rollouts.jsonl from steering/steering_rollouts.py, for the rollout score."""
    answer_scoring: Literal["sequence", "first-token"] = "sequence"
    """How p_tgt / p_src score a class name after the forced-choice prompt (spaced as in the paper's code:
    '<image>\\n Reply either ...'): 'sequence' = the probability of the whole name as the model writes it (exp of
    the summed log-probabilities of its tokens, teacher forced in the steered forward; flip = log p(tgt) > log
    p(src)); 'first-token' = the next-token probability of the first token of the name tokenized alone (the
    earlier scoring; with the Mistral tokenizer 93 of the 100 single-word classes are several tokens)."""
    batch_size: int = 32
    """Rows per forward pass (with 'sequence' scoring a case takes two rows when its names differ before their
    last token)."""
    dtype: Dtype = "float32"
    """Model dtype."""
    device: str | None = None
    """Device (default: GPU if there is one, else cpu)."""
    out: Path = Path("runs/steering_eval")
    """Output folder for metrics.json and the plots."""
    overwrite: bool = False
    """Replace the outputs of an earlier run of this script in --out (nothing else in it is touched)."""
    resize: int | None = None
    """Resize images to N x N px before the processor, as the paper (336); must match what made the input (the
    vectors' vectors.json), see --allow-resize-mismatch."""
    allow_resize_mismatch: bool = False
    """Run even when --resize differs from the resize the vectors were computed at (a different image-token count
    and grid: normally a mistake)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError
        from lineofsight.data import check_resize

        check_resize(self.resize)

        if not self.layer:
            raise UserError("--layer needs at least one layer")
        for name in ("images_per_pair", "n_captions", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.n_pairs is not None and self.n_pairs < 1:
            raise UserError("--n-pairs must be positive")


def first_token(tokenizer: Any, word: str) -> int:
    """Id of the first token of ``word`` tokenized alone (the ``--answer-scoring first-token`` id)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(ids[0])


ANSWER_KEYS = ("tgt_ids", "src_ids")


def answer_scores(model: Any, processor: Any, layer: int, cases: list[dict[str, Any]], strengths: list[float],
                  positions: str, batch_size: int, scoring: str = "first-token") -> dict[float, list[dict[str, float]]]:
    """``{k: [{tgt_ids: score, src_ids: score} per case]}`` with ``k * v`` added at ``layer``.

    A case holds an image, its prompt, the vector ``v`` and the token ids of the two answers (``tgt_ids``,
    ``src_ids``). ``scoring="first-token"``: the next-token probability of each answer's first id after the
    prompt. ``"sequence"``: the summed log-probability of all of an answer's ids after the prompt, teacher
    forced, in the same steered forward: a row is the prompt followed by the answer's ids but its last (never
    an input), so on left-padded rows the logits of the last ``n_max`` positions (``logits_to_keep``) predict
    every row's answer tokens; never the full ``[B, T, V]``. The two answers of a case share a row when they
    differ only in their last token (always, for one-token names). The appended tokens are the model's own
    output, steered as generated tokens are: only with ``positions="all"``."""
    import torch

    from lineofsight.models import vlm_inputs
    from lineofsight.steering import steer

    # Case-major, so that a batch holds few images at many k; each is encoded once (vlm_inputs).
    rows: list[tuple[float, int, tuple[int, ...]]] = []  # (k, case, ids appended to the prompt)
    for i, case in enumerate(cases):
        inputs_of = [()] if scoring == "first-token" else list(dict.fromkeys(tuple(case[key][:-1])
                                                                             for key in ANSWER_KEYS))
        rows += [(k, i, extra) for k in strengths for extra in inputs_of]
    scores: dict[tuple[float, int], dict[str, float]] = {}
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        inputs = vlm_inputs(model, processor, [cases[i]["image"] for _, i, _ in batch],
                            [cases[i]["prompt"] for _, i, _ in batch])
        n_keep = 1 + max(len(extra) for _, _, extra in batch)
        steered = inputs["attention_mask"]
        if n_keep > 1:
            inputs, prompt_mask = _append_ids(inputs, [extra for _, _, extra in batch], processor.tokenizer.pad_token_id)
            steered = inputs["attention_mask"] if positions == "all" else prompt_mask
        delta = torch.stack([k * cases[i]["v"] for k, i, _ in batch])
        with torch.no_grad(), steer(model, layer, delta, inputs["input_ids"], steered, positions):
            # Left padding: every row ends at the last position; only the last n_keep positions get logits.
            logits = model(**inputs, use_cache=False, logits_to_keep=n_keep).logits
        if scoring == "first-token":
            probs = logits[:, -1].float().softmax(-1)
            for row, (k, i, _) in enumerate(batch):
                scores[k, i] = {key: float(probs[row, cases[i][key][0]]) for key in ANSWER_KEYS}
            continue
        logp = logits.float().log_softmax(-1)  # [B, n_keep, V]
        for row, (k, i, extra) in enumerate(batch):
            for key in ANSWER_KEYS:
                ids = cases[i][key]
                if tuple(ids[:-1]) == extra:
                    target = torch.tensor(ids, device=logp.device)[:, None]
                    scores.setdefault((k, i), {})[key] = float(logp[row, n_keep - len(ids) :].gather(-1, target).sum())
    return {k: [scores[k, i] for i in range(len(cases))] for k in strengths}


def _append_ids(inputs: dict[str, Any], extras: list[tuple[int, ...]], pad_id: int) -> tuple[dict[str, Any], Any]:
    """``inputs`` with ``extras[b]`` appended to row ``b``, rows left padded again to a common length (the image
    features stay as they are: they fill the image tokens in order); and the mask of the prompt tokens alone. Every
    per-token input (:data:`lineofsight.models.TOKEN_KEYS`: Gemma 3's ``token_type_ids``, Qwen2.5-VL's
    ``mm_token_type_ids``) is shifted with the ids; the appended tokens are text (type 0)."""
    import torch

    from lineofsight.models import TOKEN_KEYS

    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    M = max(len(extra) for extra in extras)
    rows = {key: inputs[key] for key in TOKEN_KEYS if key in inputs}
    new = {key: x.new_full((B, T + M), pad_id) if key == "input_ids" else x.new_zeros((B, T + M))
           for key, x in rows.items()}
    prompt_mask = attention.new_zeros((B, T + M))
    for b, extra in enumerate(extras):
        shift = M - len(extra)
        for key, x in rows.items():
            new[key][b, shift : shift + T] = x[b]
        prompt_mask[b, shift : shift + T] = attention[b]
        if extra:
            new["input_ids"][b, T + shift :] = torch.tensor(extra, dtype=ids.dtype)
            new["attention_mask"][b, T + shift :] = 1
    return {**inputs, **new}, prompt_mask


def efficacy(model: Any, processor: Any, layer: int, cases: list[dict[str, Any]], strengths: list[float],
             positions: str, batch_size: int, scoring: str = "first-token") -> dict[float, dict[str, float]]:
    """``{k: {p_tgt, p_src, flip_rate}}`` averaged over ``cases`` (:func:`answer_scores`). ``p_tgt``/``p_src``: the
    probability of the answer, ``exp`` of its summed log-probability (``"sequence"``) or the first token's
    (``"first-token"``); ``flip_rate``: the share of cases where tgt's score is above src's."""
    import math

    per_case = answer_scores(model, processor, layer, cases, strengths, positions, batch_size, scoring)
    sums = {k: {"p_tgt": 0.0, "p_src": 0.0, "flip_rate": 0.0} for k in strengths}
    for k, scores in per_case.items():
        for s in scores:
            p_tgt, p_src = ((s["tgt_ids"], s["src_ids"]) if scoring == "first-token"
                            else (math.exp(s["tgt_ids"]), math.exp(s["src_ids"])))
            sums[k]["p_tgt"] += p_tgt
            sums[k]["p_src"] += p_src
            sums[k]["flip_rate"] += float(s["tgt_ids"] > s["src_ids"])
    return {k: {name: value / len(cases) for name, value in s.items()} for k, s in sums.items()}


def steered_caption_nll(model: Any, processor: Any, layer: int, captions: list[dict[str, Any]], v: Any,
                        strengths: list[float], positions: str, batch_size: int,
                        chunk_tokens: int = NLL_CHUNK_TOKENS) -> dict[float, float]:
    """Mean per-token NLL of the captions given image + question, with ``k * v`` added, per k.

    Logits are computed for the caption tokens' predecessors only, ``chunk_tokens`` at a time
    (:func:`lineofsight.metrics.caption_token_nll`), never for the whole ``[B, T, V]``."""
    import torch

    from lineofsight.metrics import caption_tail_mask, caption_token_nll
    from lineofsight.models import final_hidden, vlm_inputs
    from lineofsight.steering import steer

    totals = dict.fromkeys(strengths, 0.0)
    count = 0
    for lo in range(0, len(captions), batch_size):
        batch = captions[lo : lo + batch_size]
        # The image features are computed once here and reused by the forward at every k.
        inputs = vlm_inputs(model, processor, [c["image"] for c in batch], [c["text"] for c in batch])
        ids = inputs["input_ids"]
        caption = caption_tail_mask(ids, [c["n_caption_tokens"] for c in batch])  # left padding: the last n
        for k in strengths:
            delta = (k * v).expand(len(batch), -1)
            with torch.no_grad(), steer(model, layer, delta, ids, inputs["attention_mask"], positions):
                hidden = final_hidden(model, inputs)
                # One float32 sum per batch over its caption tokens in row-major order, as
                # lineofsight.metrics.caption_nll sums full logits' cross-entropy: chunking changes nothing.
                totals[k] += float(caption_token_nll(model, hidden, ids, caption, chunk_tokens).sum())
        count += int(caption.sum())
    return {k: total / count for k, total in totals.items()}


def names_in(text: str, name: str) -> bool:
    """Whether ``name`` (``_`` read as a space) occurs in ``text`` as a whole word."""
    pattern = r"\b" + re.escape(name.replace("_", " ").lower()) + r"s?\b"
    return re.search(pattern, text.lower()) is not None


def rollout_scores(path: Path, layers: list[int]) -> dict[int, dict[float, dict[str, float]]]:
    """``{layer: {k: {rollout_tgt, rollout_src, n}}}`` from a rollouts.jsonl."""
    from lineofsight.steering import read_rollouts

    acc: dict[int, dict[float, list[tuple[bool, bool]]]] = {}
    for rec in read_rollouts(path):
        if rec["layer"] in layers:
            hits = (names_in(rec["text"], rec["tgt"]), names_in(rec["text"], rec["src"]))
            acc.setdefault(rec["layer"], {}).setdefault(float(rec["k"]), []).append(hits)
    return {
        layer: {k: {"rollout_tgt": sum(t for t, _ in h) / len(h), "rollout_src": sum(s for _, s in h) / len(h),
                    "n": len(h)} for k, h in sorted(by_k.items())}
        for layer, by_k in acc.items()
    }


def plot_curves(metrics: dict[str, Any], keys: list[tuple[str, str]], ylabel: str, title: str, path: Path) -> None:
    """One line per layer (and per key) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    styles = ["-", "--", ":"]
    for layer, by_k in metrics.items():
        ks = sorted(by_k, key=float)
        for (key, label), style in zip(keys, styles):
            points = [(float(k), by_k[k][key]) for k in ks if key in by_k[k]]
            if points:
                ax.plot(*zip(*points), style, marker="o", ms=3, label=f"layer {layer}" + (f" {label}" if label else ""))
    ax.set(xlabel="steering strength k", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path)


@lifecycle("steering/eval_steering.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    from lineofsight.cli import UserError
    from lineofsight.data import (
        ClassIndex,
        SkipCounter,
        check_resize_match,
        imagenet_items,
        load_image,
        pair_key,
        read_class_pairs,
        read_sharegpt4v,
        recorded_resize,
    )
    from lineofsight.models import answer_token_ids, assistant_prefix, check_layer, check_model, format_prompt
    from lineofsight.prompts import CAPTION_QUESTION, FORCED_CHOICE_TEMPLATE
    from lineofsight.steering import load_vectors, paper_strengths, vector_pairs
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.imagenet_dir, cfg.data)
    strengths = [round(float(k), 6) for k in (cfg.k or paper_strengths())]
    index = ClassIndex.read(cfg.imagenet_dir)
    records = read_sharegpt4v(cfg.data)
    for layer in cfg.layer:  # every layer's vectors exist and were made at --resize, before the model loads
        _, vec_info = load_vectors(cfg.vectors, layer)
        check_resize_match(cfg.resize, recorded_resize(vec_info), f"the steering vectors in {cfg.vectors}",
                           cfg.allow_resize_mismatch)
    rollouts = rollout_scores(cfg.rollouts, list(cfg.layer)) if cfg.rollouts is not None else {}
    check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    for layer in cfg.layer:
        check_layer(model, layer)
    processor.tokenizer.padding_side = "left"
    tok = processor.tokenizer
    skips = SkipCounter()
    image_root = cfg.image_root or cfg.data.parent
    captions = []
    caption_prompt = format_prompt(processor, CAPTION_QUESTION)
    n_prompt = len(tok(caption_prompt, add_special_tokens=True)["input_ids"])
    for rec in records:
        if len(captions) >= cfg.n_captions:
            break
        image = load_image(image_root / rec.image, skips, cfg.resize)
        if image is None:
            continue
        text = caption_prompt + assistant_prefix(processor) + rec.caption
        n_caption = len(tok(text, add_special_tokens=True)["input_ids"]) - n_prompt
        captions.append({"image": image, "text": text, "n_caption_tokens": n_caption})
    if not captions:
        raise UserError(f"no readable caption images in {cfg.data} ({skips.summary()})")
    run.open(cfg.out, overwrite=cfg.overwrite)

    answer_cache: dict[tuple[str, str], list[int]] = {}

    def answer_ids(prompt: str, name: str) -> list[int]:
        if (prompt, name) not in answer_cache:
            try:
                answer_cache[prompt, name] = answer_token_ids(processor, prompt, name)
            except ValueError as err:
                raise UserError(f"--answer-scoring sequence: {err}") from None
        return answer_cache[prompt, name]

    metrics: dict[str, Any] = {}
    for layer in cfg.layer:
        run.check_alive()
        vectors, vec_info = load_vectors(cfg.vectors, layer)
        pairs = read_class_pairs(cfg.pairs) if cfg.pairs else vector_pairs(vec_info)
        pairs = pairs[: cfg.n_pairs]
        cases = []
        for src, tgt in pairs:
            key = pair_key(src, tgt)
            if key not in vectors:
                raise UserError(f"no steering vector for {key} at layer {layer} in {cfg.vectors}")
            src_id, tgt_id = first_token(tok, src), first_token(tok, tgt)
            if src_id == tgt_id and cfg.answer_scoring == "first-token":
                print(f"warning: {src} and {tgt} start with the same token; efficacy cannot tell them apart")
            items = imagenet_items(cfg.imagenet_dir, cfg.split, [index.label(src)], index, cfg.images_per_pair)
            for i, item in enumerate(items):
                image = load_image(cfg.imagenet_dir / item.path, skips, cfg.resize)
                if image is None:
                    continue
                a, b = (src, tgt) if i % 2 == 0 else (tgt, src)
                prompt = format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a=a, b=b))
                if cfg.answer_scoring == "first-token":
                    answers = {"src_ids": [src_id], "tgt_ids": [tgt_id]}
                else:
                    answers = {"src_ids": answer_ids(prompt, src), "tgt_ids": answer_ids(prompt, tgt)}
                cases.append({"image": image, "prompt": prompt, "v": vectors[key].float(), **answers})
        if not cases:
            raise UserError(f"no readable source images in {cfg.imagenet_dir / cfg.split} ({skips.summary()})")
        eff = efficacy(model, processor, layer, cases, strengths, cfg.positions, cfg.batch_size, cfg.answer_scoring)
        # k = 0 is the unsteered model: the same baseline for every pair, computed once.
        some_v = next(iter(vectors.values())).float()
        base = steered_caption_nll(model, processor, layer, captions, some_v, [0.0], cfg.positions, cfg.batch_size)[0.0]
        nonzero = [k for k in strengths if k != 0.0]
        damage = dict.fromkeys(strengths, 0.0)
        for src, tgt in pairs:
            nll = steered_caption_nll(model, processor, layer, captions, vectors[pair_key(src, tgt)].float(), nonzero,
                              cfg.positions, cfg.batch_size)
            for k in nonzero:
                damage[k] += (nll[k] - base) / len(pairs)
        metrics[str(layer)] = {str(k): {**eff[k], "damage_nll": damage[k], "caption_nll_unsteered": base}
                               for k in strengths}
        top = strengths[-1]
        print(f"layer {layer}: k={top:g}: p_tgt {eff[top]['p_tgt']:.3f}  p_src {eff[top]['p_src']:.3f}  "
              f"flip {eff[top]['flip_rate']:.2f}  damage {damage[top]:+.3f} nats/token", flush=True)
    for layer, by_k in rollouts.items():
        for k, s in by_k.items():
            metrics[str(layer)].setdefault(str(round(k, 6)), {}).update(s)

    result = {"metrics": metrics, "k": strengths, "positions": cfg.positions, "answer_scoring": cfg.answer_scoring,
              "n_captions": len(captions),
              "skipped": skips.to_dict(), "vectors": str(cfg.vectors), "model": cfg.model}
    ylabel = "probability of the answer" if cfg.answer_scoring == "sequence" else "probability of first token"
    plot_curves(metrics, [("p_tgt", "p(tgt)"), ("p_src", "p(src)")], ylabel,
                "Efficacy: forced choice under steering", run.out / "efficacy.png")
    plot_curves(metrics, [("damage_nll", "")], "caption NLL increase (nats/token)", "Damage", run.out / "damage.png")
    if cfg.rollouts is not None:
        plot_curves(metrics, [("rollout_tgt", "names tgt"), ("rollout_src", "names src")], "share of rollouts",
                    "Rollouts naming the classes", run.out / "rollouts.png")
    return run.finish(f"wrote {run.out}/metrics.json and plots in {time.perf_counter() - start:.1f}s; "
                      f"{skips.summary()}", result)


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
