"""Evaluate a toy-world VLM on held-out images: caption, forced-choice, yes/no and multiple-choice accuracy.

Generates the shape world if it is missing (seconds), loads the model (default: the committed
toy model), asks every held-out ``val`` image for a caption, the steering forced choice
(``Reply either "a" or "b" ...``) and a yes and a no question, asks the lettered multiple choice
(which shape, which colour; the world's MMMU-Pro-style benchmark images) and prints the
accuracies against the quality bar and a few generations. Writes ``<out>/eval.json`` for the report and
``<out>/run.json`` (config, git SHA, versions).

    python scripts/eval_toy.py                                           # the committed toy model -> results/toy
    python scripts/eval_toy.py --model runs/my_toy_model --out runs/my_toy_eval   # any model trained on the world
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle
from lineofsight.toy import MC_SUBJECTS, mc_task  # numpy + PIL only; keeps --help instant

#: The toy model's quality bar (held-out images); multiple choice per subject.
BAR = {
    "caption_acc": 0.95,
    "forced_choice_acc": 0.95,
    "yesno_acc": 0.90,
    **{f"{mc_task(subject)}_acc": 0.90 for subject in MC_SUBJECTS},
}


@dataclasses.dataclass
class Config:
    """Options for the toy-model evaluation."""

    model: str = "toy"
    """Model to evaluate: 'toy' (the committed model), a local directory or an HF id."""
    world_dir: Path = TOY_WORLD_DIR
    """Shape-world folder; the default one is (re)generated from --seed when missing or stale, another only when missing."""
    seed: int = 0
    """World seed (only used when the world is generated)."""
    n_per_class: int = 16
    """Held-out val images per class (and benchmark images per class for the multiple choice, two items each)."""
    batch_size: int = 64
    """Prompts per generate call."""
    n_examples: int = 3
    """Generations printed per task."""
    device: str | None = None
    """Device (default: GPU if there is one, else cpu)."""
    out: Path = Path("results/toy")
    """Output folder: eval.json (accuracies, bar, examples) and run.json."""
    overwrite: bool = False
    """Replace an earlier evaluation in --out."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        if self.n_per_class < 1 or self.batch_size < 1:
            raise UserError("--n-per-class and --batch-size must be positive")


@lifecycle("scripts/eval_toy.py", outputs=("eval.json",))
def main(cfg: Config, run: Run) -> dict:
    start = time.perf_counter()
    run.setup(seed=cfg.seed, device=cfg.device)
    import torch

    from lineofsight.cli import UserError
    from lineofsight.toy import evaluate_toy, generate_world

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    default_world = cfg.world_dir.resolve() == TOY_WORLD_DIR.resolve()
    has_world = (cfg.world_dir / "world.json").is_file()
    if not default_world and not has_world and cfg.world_dir.exists() and any(cfg.world_dir.iterdir()):
        raise UserError(f"--world-dir {cfg.world_dir} is not a shape world (no world.json)")
    model, processor = run.load_model(cfg.model)  # bad --model fails before any work
    run.open(cfg.out, overwrite=cfg.overwrite)
    if default_world or not has_world:
        generate_world(cfg.world_dir, seed=cfg.seed)  # a no-op when the default world on disk is current
    result = evaluate_toy(model, processor, cfg.world_dir, n_per_class=cfg.n_per_class,
                          batch_size=cfg.batch_size, n_examples=cfg.n_examples)
    print(f"held-out accuracy of {cfg.model} on {result['n_images']} images:")
    for key, bar in BAR.items():
        verdict = "ok" if result[key] >= bar else "BELOW BAR"
        print(f"  {key:<18} {result[key]:6.1%}   (bar {bar:.0%}: {verdict})")
    print("examples:")
    for task, question, answer, expected in result["examples"]:
        print(f"  [{task}] {question!r} -> {answer!r} (expected {expected!r})")
    result["bar"] = BAR
    result["meets_bar"] = all(result[k] >= v for k, v in BAR.items())
    result["model"] = cfg.model
    assert run.out is not None
    summary = (f"evaluated {cfg.model} on {result['n_images']} held-out images in {time.perf_counter() - start:.1f}s "
               f"({'meets' if result['meets_bar'] else 'BELOW'} the bar); wrote {run.out / 'eval.json'}")
    return run.finish(summary, result, "eval.json")


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
