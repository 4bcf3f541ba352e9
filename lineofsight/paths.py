"""Where the project's own files live: the repository root and the embedded toy world and model.

Only paths, no imports: the library's generic modules (``models``, ``data``) resolve the
``"toy"`` defaults through these constants without importing :mod:`lineofsight.toy`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "TOY_MODEL_DIR", "TOY_WORLD_DIR"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_WORLD_DIR = REPO_ROOT / "data" / "toy" / "world"
"""The generated shape world (git-ignored; :func:`lineofsight.toy.generate_world` writes it)."""
TOY_MODEL_DIR = REPO_ROOT / "data" / "toy" / "model"
"""The committed toy LLaVA-NeXT (``save_pretrained`` format); ``--model toy`` loads it."""
