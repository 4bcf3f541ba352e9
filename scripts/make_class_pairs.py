"""Draw seeded ``src@tgt`` class pairs from a list of class names (``data/class_pairs.txt``).

The paper steered between 1000 ordered pairs of 100 single-word ImageNet classes, 50 pairs per
experiment; the steering scripts take the first ``--n-pairs`` lines of this file.

    python scripts/make_class_pairs.py            # rewrites data/class_pairs.txt (deterministic)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class Config:
    """Options for drawing class pairs."""

    classes: Path = Path("data/single_word_classes.txt")
    """File with one class name per line (# comments allowed)."""
    n_pairs: int = 1000
    """Number of distinct ordered pairs (src != tgt)."""
    seed: int = 0
    """Seed of the draw."""
    out: Path = Path("data/class_pairs.txt")
    """Output file, one src@tgt per line."""


def draw_pairs(names: list[str], n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """``n_pairs`` distinct ordered pairs of different names, in a seeded random order."""
    import numpy as np

    from lineofsight.cli import UserError

    all_pairs = [(a, b) for a in names for b in names if a != b]
    if not 0 < n_pairs <= len(all_pairs):
        raise UserError(f"--n-pairs must be in 1..{len(all_pairs)} for {len(names)} classes")
    order = np.random.default_rng(seed).permutation(len(all_pairs))[:n_pairs]
    return [all_pairs[i] for i in order]


def main(cfg: Config) -> None:
    from lineofsight.cli import UserError
    from lineofsight.io import atomic_write_text

    if not cfg.classes.is_file():
        raise UserError(f"--classes {cfg.classes} does not exist")
    names = [line.strip() for line in cfg.classes.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(names)) != len(names):
        raise UserError(f"--classes {cfg.classes} lists a class twice")
    pairs = draw_pairs(names, cfg.n_pairs, cfg.seed)
    header = f"# {cfg.n_pairs} seeded (seed {cfg.seed}) src@tgt pairs over {cfg.classes}; scripts/make_class_pairs.py\n"
    atomic_write_text(cfg.out, header + "".join(f"{a}@{b}\n" for a, b in pairs))
    print(f"wrote {len(pairs)} pairs over {len(names)} classes to {cfg.out}")


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
