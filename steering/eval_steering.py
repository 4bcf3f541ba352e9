"""Efficacy and damage of class steering vectors over the strength k, per layer.

- **Efficacy**: held-out images of ``src`` with the prompt ``Reply either "{src}" or "{tgt}" in
  lowercase depending on what is shown in the image. Do not output any other text.`` (the order of
  the two names alternates between images); with ``k * v`` added at the image tokens of the layer,
  the next-token probability of the first token of ``tgt`` (``p_tgt``) and of ``src`` (``p_src``),
  and the flip rate (share of images where ``tgt`` is more likely than ``src``).
- **Damage**: the increase in mean caption NLL (ShareGPT4V-format captions given the image and
  ``What is shown in this image?``) under the same intervention, ``NLL(k) - NLL(0)``, averaged
  over pairs.
- **Rollout score** (with ``--rollouts``): the share of steered rollouts that name ``tgt`` and the
  share that still name ``src``, per k (a cheap automatic proxy for the paper's human ratings).

Writes ``<out>/metrics.json`` (``metrics[layer][k]`` holds ``p_tgt``, ``p_src``, ``flip_rate``,
``damage_nll`` and, with rollouts, ``rollout_tgt``/``rollout_src``) and plots ``efficacy.png``,
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
    batch_size: int = 32
    """Prompts per forward pass."""
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
    """Id of the first token the model would emit to start answering ``word``."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(ids[0])


def efficacy(model: Any, processor: Any, layer: int, cases: list[dict[str, Any]], strengths: list[float],
             positions: str, batch_size: int) -> dict[float, dict[str, float]]:
    """``{k: {p_tgt, p_src, flip_rate}}`` averaged over ``cases`` (image, prompt, v, ids of tgt/src)."""
    import torch

    from lineofsight.models import vlm_inputs
    from lineofsight.steering import steer

    sums = {k: {"p_tgt": 0.0, "p_src": 0.0, "flip_rate": 0.0} for k in strengths}
    # Case-major, so that a batch holds few images at many k; each is encoded once (vlm_inputs).
    work = [(k, case) for case in cases for k in strengths]
    for lo in range(0, len(work), batch_size):
        batch = work[lo : lo + batch_size]
        inputs = vlm_inputs(model, processor, [c["image"] for _, c in batch], [c["prompt"] for _, c in batch])
        delta = torch.stack([k * c["v"] for k, c in batch])
        with torch.no_grad(), steer(model, layer, delta, inputs["input_ids"], inputs["attention_mask"], positions):
            # Left padding: the last position is every row's next token; only it gets logits ([B, 1, V]).
            probs = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float().softmax(-1)
        for row, (k, c) in enumerate(batch):
            p_tgt, p_src = float(probs[row, c["tgt_id"]]), float(probs[row, c["src_id"]])
            sums[k]["p_tgt"] += p_tgt
            sums[k]["p_src"] += p_src
            sums[k]["flip_rate"] += float(p_tgt > p_src)
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
    from lineofsight.models import check_layer, check_model, format_prompt
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
        text = caption_prompt + " " + rec.caption
        n_caption = len(tok(text, add_special_tokens=True)["input_ids"]) - n_prompt
        captions.append({"image": image, "text": text, "n_caption_tokens": n_caption})
    if not captions:
        raise UserError(f"no readable caption images in {cfg.data} ({skips.summary()})")
    run.open(cfg.out, overwrite=cfg.overwrite)

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
            if src_id == tgt_id:
                print(f"warning: {src} and {tgt} start with the same token; efficacy cannot tell them apart")
            items = imagenet_items(cfg.imagenet_dir, cfg.split, [index.label(src)], index, cfg.images_per_pair)
            for i, item in enumerate(items):
                image = load_image(cfg.imagenet_dir / item.path, skips, cfg.resize)
                if image is None:
                    continue
                a, b = (src, tgt) if i % 2 == 0 else (tgt, src)
                cases.append({"image": image, "prompt": format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a=a, b=b)),
                              "v": vectors[key].float(), "src_id": src_id, "tgt_id": tgt_id})
        if not cases:
            raise UserError(f"no readable source images in {cfg.imagenet_dir / cfg.split} ({skips.summary()})")
        eff = efficacy(model, processor, layer, cases, strengths, cfg.positions, cfg.batch_size)
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

    result = {"metrics": metrics, "k": strengths, "positions": cfg.positions, "n_captions": len(captions),
              "skipped": skips.to_dict(), "vectors": str(cfg.vectors), "model": cfg.model}
    plot_curves(metrics, [("p_tgt", "p(tgt)"), ("p_src", "p(src)")], "probability of first token",
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
