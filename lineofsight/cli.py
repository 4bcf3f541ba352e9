"""Command-line plumbing shared by every script: one parser (tyro), one error path.

A user mistake (bad path, layer out of range, unknown class) raises :class:`UserError`
anywhere in a script; :func:`run` turns it into a one-line ``error: ...`` on stderr and
exit code 2, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["UserError", "check_finite", "parse", "run"]

C = TypeVar("C")


class UserError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


def parse(config_cls: type[C], args: Sequence[str] | None = None, description: str | None = None) -> C:
    """Parse ``args`` (default ``sys.argv[1:]``) into ``config_cls`` with tyro.

    Field docstrings become ``--help`` text. Validation in ``__post_init__`` may raise
    :class:`UserError`, which :func:`run` reports.
    """
    import tyro

    return tyro.cli(config_cls, args=args, description=description)


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Refuse a config whose float options (alone or in a tuple) are NaN or infinite.

    No option of this project means anything at NaN or infinity, and a NaN slips through every
    range check (``nan < 0`` is False): a NaN strength never equals itself as a key, a NaN or
    infinite learning rate destroys a run. Nested config dataclasses are checked too.
    """
    if not dataclasses.is_dataclass(cfg):
        return
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{prefix}{field.name.replace('_', '-')}.")
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} {v}: not a finite number")


def run(main: Callable[[C], object], config_cls: type[C], args: Sequence[str] | None = None) -> None:
    """Parse the command line into ``config_cls`` and call ``main(cfg)``.

    ``UserError`` -> ``error: <message>`` on stderr, exit code 2.
    """
    try:
        cfg = parse(config_cls, args, description=(sys.modules[main.__module__].__doc__ or None))
        check_finite(cfg)
        main(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
