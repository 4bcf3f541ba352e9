"""Multiple-choice accuracy with SAEs spliced in: MMMU-Pro, MMMU and A-OKVQA, clean vs spliced vs ablated.

Conditions, all scored on the same items in one pass:

- ``clean``: the model as it is;
- ``sae:<name>``: each ``--sae``'s reconstruction replaces the residual at the image-token positions of its layer
  (the input of decoder block L, the project's convention; positions found from ``input_ids``, never a slice);
- ``zero:L<layer>``: the image-token residual zeroed at each SAE's layer, the floor (with ``--zero-ablate``).

The prompt (:func:`lineofsight.prompts.multiple_choice`, in the model's chat format with the item's first image)::

    [INST] <image>
    {question}
    A. {option 1}
    B. {option 2}
    ...
    Answer with the option's letter from the given choices directly. [/INST]

LLaVA's direct-answer multiple-choice prompt, which the paper's benchmark notebooks asked with the first image
resized to 336 x 336 (``--resize 336``). Scoring (``--scoring``):

- ``logits`` (default): the next token's logits over the item's valid option letters, each letter's token as the
  model writes it after the prompt (:func:`lineofsight.models.answer_token_ids`); the argmax is the answer. Never
  unparseable.
- ``greedy``: the paper's decode-and-compare: the greedy next token over the whole vocabulary, decoded and
  stripped, must equal the answer letter; a token that is no option letter is counted ``unparseable`` (and wrong).

Both come from the same forward and both are recorded; ``--scoring`` picks the headline. The forward is batched
(``--batch-size`` items), without a KV cache, with logits for the last position only; the conditions fork at the
earliest SAE layer (:func:`lineofsight.hooks.fork_batch`), so the vision tower and the blocks before it run once
per item, not once per condition.

Data, in the Hugging Face schemas (:mod:`lineofsight.benchmarks`): ``--data`` is the hub id (the default) or a
local copy (a ``save_to_disk`` folder, or parquet files laid out as on the hub; MMMU: a folder per subject).
``MMMU/MMMU_Pro`` is read in its ``standard (4 options)`` config, split ``test``; ``MMMU/MMMU`` per subject, split
``validation``, its open-ended items counted and excluded; ``HuggingFaceM4/A-OKVQA`` split ``validation``. Items
that cannot be scored (no image, an unreadable one, malformed options or answer) are counted by reason.

Writes into ``--out``: ``metrics.json`` (per condition: accuracy with a 95 % Wilson interval, chance level,
unparseable count; clean -> each condition: the paired difference with a 95 % interval; per subject; what was
skipped), ``predictions.jsonl`` (each item's letter per condition and scoring), ``accuracy.png`` and ``run.json``.

    python sae/evaluation/eval_benchmark.py --benchmark mmmu-pro --sae runs/demo/sae --out results/benchmark  # toy
    python sae/evaluation/eval_benchmark.py --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 \\
        --benchmark mmmu-pro --resize 336 --sae saes/L16 saes/L24 --out results/mmmu-pro
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.models import Dtype
from lineofsight.run import Run, lifecycle

OUTPUTS = ("metrics.json", "predictions.jsonl", "accuracy.png")
SCORINGS = ("logits", "greedy")


@dataclasses.dataclass
class Config:
    """Options for the multiple-choice benchmark evaluation."""

    benchmark: Literal["mmmu-pro", "mmmu", "aokvqa"] = "mmmu-pro"
    """Which benchmark: MMMU-Pro (standard, 4 options; test), MMMU (validation, per subject) or A-OKVQA (validation
    multiple choice)."""
    data: str | None = None
    """Hub id or local copy (save_to_disk folder, or parquet files; MMMU: a folder per subject). Default: the toy
    world's copy for --model toy (mmmu-pro, aokvqa), else the hub id."""
    split: str | None = None
    """Split (default: test for MMMU-Pro, validation for MMMU and A-OKVQA)."""
    config: str | None = None
    """Hub config of MMMU-Pro (default 'standard (4 options)'; MMMU's configs are its subjects: see --subjects)."""
    subjects: tuple[str, ...] = ()
    """Only these subjects (MMMU: its hub configs, default all 30; others: values of the subject column)."""
    limit: int | None = None
    """Score at most this many items (in dataset order)."""
    sae: tuple[Path, ...] = ()
    """SAE folders, or trainer runs (each standing for all its SAEs), each spliced at its own layer."""
    zero_ablate: bool = True
    """Also score with the image-token residual zeroed at each SAE's layer (the floor)."""
    scoring: Literal["logits", "greedy"] = "logits"
    """Headline scoring: the next token's logits over the option letters, or the paper's greedy token compared with
    the answer letter (both are always recorded)."""
    model: str = "toy"
    """Model: 'toy', an HF id or a local directory."""
    dtype: Dtype = "float32"
    """Model dtype."""
    device: str | None = None
    """Device (default: GPU if there is one, else cpu)."""
    batch_size: int = 8
    """Items per forward pass."""
    fork_rows: int | None = None
    """Rows the blocks from the earliest SAE layer on run at once over all conditions (conditions x batch rows).
    Default: one batch's rows, so the peak stays near a plain forward's. Results do not depend on it."""
    resize: int | None = None
    """Resize the first image to N x N px before the processor (the paper: 336); must match the SAEs' recorded
    resize, see --allow-resize-mismatch."""
    allow_resize_mismatch: bool = False
    """Run even when --resize differs from the resize an SAE was trained at (normally a mistake)."""
    out: Path = Path("runs/benchmark")
    """Output folder (refused when it holds an earlier run of this script, unless --overwrite)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run of this script in --out (nothing else in it is touched)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError
        from lineofsight.data import check_resize

        check_resize(self.resize)
        if self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be positive")
        if self.fork_rows is not None and self.fork_rows < 1:
            raise UserError(f"--fork-rows must be positive, got {self.fork_rows}")


@dataclasses.dataclass
class Splice:
    """One spliced condition: an SAE (or None: zeros) at a layer."""

    name: str
    layer: int
    sae: Any = None


def conditions_of(saes: list[tuple[str, Any]], zero_ablate: bool) -> list[Splice]:
    """The non-clean conditions: one per SAE (``sae:<name>``), then one zero-ablation per distinct SAE layer."""
    out = [Splice(f"sae:{name}", sae.cfg.layer, sae) for name, sae in saes]
    if zero_ablate:
        out += [Splice(f"zero:L{layer}", layer) for layer in sorted({sae.cfg.layer for _, sae in saes})]
    return out


@dataclasses.dataclass(frozen=True)
class Letters:
    """The option letters as the model writes them after a prompt."""

    ids: list[int] | None
    """one token id per letter, or None unless each letter is one distinct token (then logits over the letters
    could not tell the options apart, and only greedy scoring works)"""
    texts: list[str]
    """each letter's tokens decoded and stripped: what a greedy answer must read (the toy's lowercasing tokenizer
    writes "a" for "A")"""


def option_letters(processor: Any, n: int) -> Letters:
    """The first ``n`` option letters, tokenized as answers to a multiple-choice prompt
    (:func:`lineofsight.models.answer_token_ids`)."""
    from lineofsight.cli import UserError
    from lineofsight.models import answer_token_ids, format_prompt
    from lineofsight.prompts import MC_LETTERS, multiple_choice

    prompt = format_prompt(processor, multiple_choice("?", ["x"] * n))
    try:
        ids = [answer_token_ids(processor, prompt, letter) for letter in MC_LETTERS[:n]]
    except ValueError as err:
        raise UserError(f"the model cannot answer with option letters: {err}") from None
    texts = [processor.tokenizer.decode(i).strip() for i in ids]
    single = all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == n
    return Letters([i[0] for i in ids] if single else None, texts)


def forward_conditions(model: Any, processor: Any, items: list[Any], splices: list[Splice],
                       fork_rows: int | None = None) -> Any:
    """Next-token logits ``[V * B, vocab]`` (float32) of the B ``items`` under the V conditions, condition-major
    (``clean`` first, then ``splices``), from one forward of the batch: the rows fork at the earliest splice's layer
    (before it, everything runs once), each splice edits its own rows at its layer's input, image positions only."""
    import contextlib

    import torch

    from lineofsight.hooks import Trace, fork_batch
    from lineofsight.models import final_norm_name, format_prompt, image_token_mask, layer_names, vlm_inputs
    from lineofsight.prompts import multiple_choice

    prompts = [format_prompt(processor, multiple_choice(it.question, it.options)) for it in items]
    inputs = vlm_inputs(model, processor, [it.image for it in items], prompts)
    image_BT = image_token_mask(inputs["input_ids"], model)
    B, V = len(items), 1 + len(splices)
    names = layer_names(model)

    def edit_rows(v: int, sp: Splice) -> Any:
        def edit(x: Any) -> Any:
            rows = x[v * B : (v + 1) * B]  # a view: this condition's rows of the forked batch
            rows[image_BT] = 0 if sp.sae is None else sp.sae.reconstruct(rows[image_BT])
            return x

        return edit

    with torch.no_grad(), contextlib.ExitStack() as stack:
        if splices:
            first = min(sp.layer for sp in splices)
            stack.enter_context(fork_batch(model, [*names[first:], final_norm_name(model)], lambda x: [x] * V,
                                           rows=fork_rows or B))
            for v, sp in enumerate(splices, start=1):  # entered after the fork: their hooks see the forked rows
                stack.enter_context(Trace(model, names[sp.layer], retain_output=False, edit_input=edit_rows(v, sp)))
        return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def choices(logits_RW: Any, items: list[Any], names: list[str], letters: Letters, tokenizer: Any
            ) -> list[dict[str, dict[str, int | None]]]:
    """Per item, per condition: the option index chosen by ``logits`` (the argmax over the item's option letters;
    None without single-token letters) and by ``greedy`` (the vocabulary's argmax, decoded and stripped, if it reads
    as one of the item's letters, else None: unparseable)."""
    B = len(items)
    greedy_R = logits_RW.argmax(-1).tolist()
    decoded = {t: tokenizer.decode([t]).strip() for t in set(greedy_R)}
    out = []
    for b, it in enumerate(items):
        n = len(it.options)
        per: dict[str, dict[str, int | None]] = {}
        for v, name in enumerate(names):
            r = v * B + b
            text = decoded[greedy_R[r]]
            per[name] = {"logits": None if letters.ids is None else int(logits_RW[r, letters.ids[:n]].argmax()),
                         "greedy": letters.texts.index(text) if text in letters.texts[:n] else None}
        out.append(per)
    return out


def summarize(items: list[Any], preds: list[dict[str, dict[str, int | None]]], names: list[str],
              scoring: str) -> dict[str, Any]:
    """Accuracy per condition (Wilson 95 % interval), chance, unparseable, the paired difference clean -> each
    condition, and per subject, under ``scoring`` (and the other scoring's accuracy beside it)."""
    from lineofsight.metrics import paired_difference, wilson_interval

    def correct(name: str, how: str, sel: list[int]) -> list[bool]:
        return [preds[i][name][how] == items[i].answer for i in sel]

    everything = list(range(len(items)))
    subjects = sorted({it.subject for it in items})
    out: dict[str, Any] = {"n_items": len(items),
                           "chance": sum(1 / len(it.options) for it in items) / max(len(items), 1),
                           "conditions": {}, "by_subject": {}}
    for name in names:
        right = correct(name, scoring, everything)
        lo, hi = wilson_interval(sum(right), len(right))
        other = "greedy" if scoring == "logits" else "logits"
        out["conditions"][name] = {
            "accuracy": sum(right) / max(len(right), 1), "ci95": [lo, hi], "n_correct": sum(right),
            # None when the other scoring could not run (option letters that are not single tokens: no logits)
            f"accuracy_{other}": None if preds and preds[0][name][other] is None and other == "logits"
            else sum(correct(name, other, everything)) / max(len(items), 1),
            "unparseable_greedy": sum(preds[i][name]["greedy"] is None for i in everything),
        }
        if name != "clean":
            out["conditions"][name]["vs_clean"] = paired_difference(correct("clean", scoring, everything), right)
    for subject in subjects:
        sel = [i for i, it in enumerate(items) if it.subject == subject]
        out["by_subject"][subject] = {"n": len(sel), **{
            name: sum(correct(name, scoring, sel)) / len(sel) for name in names}}
    return out


def plot(summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    names = list(summary["conditions"])
    acc = [summary["conditions"][n]["accuracy"] for n in names]
    lo = [a - summary["conditions"][n]["ci95"][0] for n, a in zip(names, acc, strict=True)]
    hi = [summary["conditions"][n]["ci95"][1] - a for n, a in zip(names, acc, strict=True)]
    colours = ["tab:blue" if n == "clean" else "tab:orange" if n.startswith("sae:") else "tab:grey" for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), acc, yerr=[lo, hi], capsize=4, color=colours)
    ax.axhline(summary["chance"], ls="--", c="k", lw=1, label=f"chance {summary['chance']:.2f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="accuracy (95 % CI)", title=title)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _sae_names(paths: tuple[Path, ...]) -> list[Path]:
    """Each --sae path as its SAE folders (a trainer run: all of its SAEs)."""
    from lineofsight.sae import run_saes

    return [p for path in paths for p in (run_saes(path) or [path])]


@lifecycle("sae/evaluation/eval_benchmark.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    from tqdm import tqdm

    from lineofsight.benchmarks import BENCHMARKS, read_items
    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter, check_resize_match
    from lineofsight.io import atomic_write_text
    from lineofsight.models import check_model
    from lineofsight.paths import TOY_WORLD_DIR
    from lineofsight.prompts import MC_LETTERS
    from lineofsight.sae import check_sae_fits, load_sae
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    data = cfg.data
    if data is None and cfg.model == "toy":
        if cfg.benchmark == "mmmu":
            raise UserError("the toy world has no MMMU copy (only mmmu-pro and aokvqa); pass --data")
        data = str(TOY_WORLD_DIR / "benchmarks" / cfg.benchmark.replace("-", "_"))
    if data is not None:
        ensure_toy_world(data)  # generated (or refreshed when stale) when --data points into the toy world
    sae_paths = _sae_names(cfg.sae)
    saes = [(p.name, load_sae(p, run.device)) for p in sae_paths]
    for path, (_, sae) in zip(sae_paths, saes, strict=True):
        check_resize_match(cfg.resize, sae.cfg.resize, f"the SAE {path}", cfg.allow_resize_mismatch)
    names_seen: dict[str, int] = {}
    for i, (name, sae) in enumerate(saes):  # two SAEs of one name (folders of different runs): keep both apart
        names_seen[name] = names_seen.get(name, 0) + 1
        if names_seen[name] > 1:
            saes[i] = (f"{name}#{names_seen[name]}", sae)
    model_source = check_model(cfg.model)
    # The items first (their images stay encoded until scored): a bad --data fails before the model loads.
    skips, counts = SkipCounter(), {}
    items = list(read_items(cfg.benchmark, data, cfg.split, cfg.config, cfg.subjects, cfg.limit, cfg.resize, skips,
                            counts))
    if not items:
        raise UserError(f"no scorable items in {data or BENCHMARKS[cfg.benchmark].hub_id} ({skips.summary()}"
                        f"{'; ' + str(counts['n_open']) + ' open-ended' if counts.get('n_open') else ''})")
    model, processor = run.load_model(cfg.model, cfg.dtype)
    processor.tokenizer.padding_side = "left"
    for _, sae in saes:
        check_sae_fits(sae, model, model_source, None)
    splices = conditions_of(saes, cfg.zero_ablate)
    names = ["clean", *(sp.name for sp in splices)]
    letters = option_letters(processor, max(len(it.options) for it in items))
    if letters.ids is None and cfg.scoring == "logits":
        raise UserError("the tokenizer does not write the option letters as distinct single tokens after the prompt, "
                        "so logits over them cannot tell the options apart; use --scoring greedy")
    run.open(cfg.out, overwrite=cfg.overwrite)

    preds: list[dict[str, dict[str, int | None]]] = []
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(items), cfg.batch_size), desc=f"{cfg.benchmark}, {len(names)} conditions",
                   unit="batch", file=sys.stdout, mininterval=10):
        run.check_alive()
        batch = items[lo : lo + cfg.batch_size]
        logits = forward_conditions(model, processor, batch, splices, cfg.fork_rows)
        preds += choices(logits, batch, names, letters, processor.tokenizer)
    forward_s = time.perf_counter() - t0
    summary = summarize(items, preds, names, cfg.scoring)
    bench = BENCHMARKS[cfg.benchmark]
    result = {
        "benchmark": cfg.benchmark, "data": data or bench.hub_id, "split": cfg.split or bench.split,
        "config": cfg.config or bench.config, "scoring": cfg.scoring, "model": model_source, "resize": cfg.resize,
        "saes": {f"sae:{name}": {"path": str(p), "layer": sae.cfg.layer}
                 for p, (name, sae) in zip(sae_paths, saes, strict=True)},
        **summary, "skipped": skips.to_dict(), **counts, "forward_s": round(forward_s, 2),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    lines = [json.dumps({"id": it.id, "subject": it.subject, "answer": it.letter, "n_options": len(it.options),
                         "pred": {name: {how: None if p[name][how] is None else MC_LETTERS[p[name][how]]
                                         for how in SCORINGS} for name in names}})
             for it, p in zip(items, preds, strict=True)]
    atomic_write_text(run.out / "predictions.jsonl", "\n".join(lines) + "\n")
    plot(summary, f"{cfg.benchmark} ({len(items)} items, {cfg.scoring} scoring)", run.out / "accuracy.png")
    print_table(result)
    extra = f"; {counts['n_open']} open-ended excluded" if counts.get("n_open") else ""
    return run.finish(f"wrote {run.out}/metrics.json ({len(items)} items, {len(names)} conditions, "
                      f"{forward_s:.1f}s of forwards); {skips.summary()}{extra}", result)


def print_table(result: dict[str, Any]) -> None:
    print(f"{'condition':<16}{'accuracy':>10}{'95% CI':>16}{'vs clean':>10}")
    for name, c in result["conditions"].items():
        diff = f"{c['vs_clean']['diff']:+.3f}" if "vs_clean" in c else ""
        ci = "[{:.3f}, {:.3f}]".format(*c["ci95"])
        print(f"{name:<16}{c['accuracy']:>10.3f}{ci:>16}{diff:>10}")
    print(f"chance {result['chance']:.3f}; {result['n_items']} items")


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
