"""One run lifecycle for every script: set-up, output folder, lock, run record, finish.

Every script's ``main`` is wrapped by :func:`lifecycle`, which hands it a :class:`Run`::

    @lifecycle("probes/train_probe.py", outputs=("metrics.json", "probe_layer*"))
    def main(cfg: Config, run: Run) -> dict:
        run.setup(seed=cfg.seed, device=cfg.device)        # torchrun or not, device, seeds
        ...                                                # validate the inputs (flags, files, model)
        run.open(cfg.out, overwrite=cfg.overwrite)         # the output-folder policy, the lock, run.json
        ...                                                # the work; long loops call run.check_alive()
        return run.finish("wrote ...", metrics)            # metrics.json, run.json, the summary line

**The output-folder policy** (:meth:`Run.open`), applied after the inputs are validated:

- a new or empty folder is used as it is;
- a folder that holds a run record (``run.json``) of the *same* script is refused unless
  ``--overwrite`` (its outputs are removed, then the run starts again) or ``--resume`` (scripts
  that can continue: the SAE trainer, caches, rollouts);
- anything else is refused with a one-line error, with or without those flags: a folder of the
  user's files, a model folder, another script's run, ``.`` or any folder above the working
  directory, ``/``, the home directory and the repository root.

``--overwrite`` removes only what the script declares it writes (``outputs``, glob patterns over
the folder's top level) and the run record; anything else in the folder is left alone and named.

**The lock.** From :meth:`Run.open` until the run ends, ``<out>/.lock`` is held with an exclusive
``flock`` (rank 0 holds it under torchrun). The OS releases it when the process dies, so a crash
never leaves a stale lock; a second run into the folder exits 2 with "``<out>`` is in use by pid N
on HOST".

**The run record** ``<out>/run.json``: script, command line, full config, git SHA and whether the
tree was dirty, library versions, world size, host, pid, start and end time, status (``running``,
``done``, ``failed``), the final one-line summary, and earlier sessions of a resumed run.

**Orphaned workers.** Under torchrun, :meth:`Run.check_alive` (called by long loops once per step)
stops a worker whose launcher has died (its parent process changed) before it writes anything
more, so the last checkpoint stays intact for ``--resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lineofsight.cli import UserError, check_finite
from lineofsight.paths import REPO_ROOT

if TYPE_CHECKING:
    import torch

    from lineofsight.dist import DistInfo

__all__ = ["LOCK_FILE", "RUN_RECORD", "Run", "jsonable", "lifecycle", "read_run_record"]

RUN_RECORD = "run.json"
LOCK_FILE = ".lock"
# Left by an atomic write (lineofsight.io) that was killed half-way; always the project's.
_TEMP_PATTERNS = (".*.tmp",)

C = TypeVar("C")
R = TypeVar("R")


def jsonable(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def read_run_record(folder: Path | str) -> dict[str, Any] | None:
    """``<folder>/run.json``, or None when there is none; :class:`UserError` when it is corrupt."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a valid run record ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("script"), str):
        raise UserError(f"{path} is not a run record of this project (no script name in it)")
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _protected(folder: Path) -> str | None:
    """Why ``folder`` may never be a run's output folder, or None."""
    cwd = Path.cwd().resolve()
    if folder == Path(folder.anchor):
        return "the filesystem root"
    if folder == Path.home().resolve():
        return "your home directory"
    if folder == REPO_ROOT or folder in REPO_ROOT.parents:
        return "the repository root" if folder == REPO_ROOT else "a folder above the repository"
    if folder == cwd or folder in cwd.parents:
        return "the current directory" if folder == cwd else "a folder above the current directory"
    return None


def _project_entries(folder: Path) -> set[str]:
    return {LOCK_FILE} | {p.name for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, t) for t in _TEMP_PATTERNS)}


class Run:
    """One execution of a script; see the module docstring. Made by :func:`lifecycle`."""

    def __init__(self, script: str, cfg: Any, outputs: Sequence[str] = (), resumable: bool = False) -> None:
        self.script = script
        """The script, relative to the repository (``probes/train_probe.py``): what run.json is keyed by."""
        self.cfg = cfg
        self.outputs = tuple(outputs)
        """Glob patterns of the top-level entries the script writes into its folder."""
        self.resumable = resumable
        self.out: Path | None = None
        """The output folder, once :meth:`open` has taken it."""
        self.resumed = False
        """Whether :meth:`open` continued an earlier run of this script (``--resume``)."""
        self.info: DistInfo | None = None
        self._lock_fd: int | None = None
        self._folder: Path | None = None  # rank 0's locked folder, where run.json is written
        self._record: dict[str, Any] = {}
        self._parent: int | None = None
        self._finished = False

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self, seed: int | None = 0, device: str | None = None, timeout_s: float | None = None) -> DistInfo:
        """Join torchrun's process group when launched by it, choose the device, seed every RNG.

        ``device``: ``None`` (this rank's GPU if there is one, else the CPU), ``"cpu"``, ``"cuda"``
        or ``"cuda:N"``; anything else, or CUDA on a machine without it, is a :class:`UserError`.
        Rank r is seeded with ``seed + r``. ``timeout_s``: how long a collective waits for the
        other ranks before this rank stops with a one-line error (default
        ``$LINEOFSIGHT_DIST_TIMEOUT_S``, else 1800 s; see :mod:`lineofsight.dist`).
        """
        import torch

        from lineofsight import dist

        if device is not None:
            kind = device.split(":", 1)[0]
            if kind not in ("cpu", "cuda") or (kind == "cpu" and device != "cpu"):
                raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N")
            if kind == "cuda" and not torch.cuda.is_available():
                raise UserError(f"--device {device}: no CUDA device is available on this machine")
        self.info = dist.setup(seed=seed, device=device, timeout_s=timeout_s)
        if dist._launched_by_torchrun():
            self._parent = os.getppid()
        return self.info

    @property
    def device(self) -> torch.device:
        if self.info is None:
            raise RuntimeError("Run.setup() has not been called")
        return self.info.device

    @property
    def is_main(self) -> bool:
        return self.info is None or self.info.is_main

    def load_model(self, model: str, dtype: str = "float32") -> tuple[Any, Any]:
        """:func:`lineofsight.models.load_vlm` on this run's device."""
        from lineofsight.models import load_vlm

        return load_vlm(model, dtype=dtype, device=self.device)

    # ---- the output folder ------------------------------------------------------------------------

    def open(self, out: Path | str, *, overwrite: bool = False, resume: bool = False) -> bool:
        """Take ``out`` as this run's output folder (see the module docstring); returns :attr:`resumed`.

        Under torchrun rank 0 decides, takes the lock and writes run.json; the other ranks get
        its verdict (the same :class:`UserError` on every rank) and wait for it.
        """
        from lineofsight import dist

        if overwrite and resume:
            raise UserError("--resume and --overwrite exclude each other")
        if resume and not self.resumable:
            raise UserError(f"{self.script} cannot continue a run; --resume is not supported")
        folder = Path(out).expanduser().resolve()
        error, resumed = None, False
        if self.is_main:
            try:
                resumed = self._take(folder, overwrite, resume)
            except UserError as err:
                error = str(err)
        verdict = dist.broadcast_object((error, resumed))
        if verdict[0] is not None:
            raise UserError(verdict[0])
        dist.barrier()
        self.out, self.resumed = folder, bool(verdict[1])
        return self.resumed

    def _take(self, folder: Path, overwrite: bool, resume: bool) -> bool:
        """Rank 0's part of :meth:`open`: check, lock, clear (``--overwrite``), record."""
        mode = self._check(folder, overwrite, resume)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock(folder)
        self._folder = folder
        try:
            previous = read_run_record(folder)
            if mode == "overwrite":
                self._clear(folder)
            self._record = {
                "script": self.script,
                "command": [sys.executable, *sys.argv],
                "config": jsonable(self.cfg) if dataclasses.is_dataclass(self.cfg) else None,
                "status": "running",
                "started": _now(),
                "ended": None,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "world_size": self.info.world_size if self.info else 1,
                "outputs": list(self.outputs),
                "summary": None,
            }
            if mode == "resume" and previous is not None:
                earlier = previous.get("sessions", [])
                self._record["sessions"] = [*earlier, {k: previous.get(k) for k in
                                                       ("started", "ended", "status", "summary", "command")}]
            from lineofsight.io import provenance

            self._record.update(provenance())
            self._write_record()
        except BaseException:
            self._folder = None
            self._unlock()
            raise
        return mode == "resume"

    def _check(self, folder: Path, overwrite: bool, resume: bool) -> str:
        """``new``, ``resume`` or ``overwrite`` for ``folder``, or :class:`UserError`; writes nothing."""
        why = _protected(folder)
        if why:
            raise UserError(f"--out {folder} is {why}; refusing to write a run there (choose a new folder)")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file, not a folder")
        if not folder.exists() or not set(os.listdir(folder)) - _project_entries(folder):
            return "new"
        record = read_run_record(folder)
        if record is None:
            raise UserError(f"--out {folder} is not empty and holds no run record ({RUN_RECORD}) of this project; "
                            "choose a new or empty folder")
        if record["script"] != self.script:
            raise UserError(f"--out {folder} holds a run of {record['script']}, not of {self.script}; "
                            "choose another --out")
        if overwrite:
            return "overwrite"
        if resume:
            return "resume"
        hint = "--resume to continue it or --overwrite" if self.resumable else "--overwrite"
        raise UserError(f"--out {folder} already holds a run of {self.script} (started {record.get('started')}); "
                        f"pass {hint} to start again, or choose another --out")

    def _clear(self, folder: Path) -> None:
        """Remove the outputs of the earlier run (declared patterns + run.json); keep everything else."""
        patterns = (*self.outputs, RUN_RECORD, *_TEMP_PATTERNS)
        kept = []
        for entry in sorted(folder.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            if any(fnmatch.fnmatch(entry.name, p) for p in patterns):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            else:
                kept.append(entry.name)
        if kept:
            print(f"--overwrite: kept {len(kept)} entries {self.script} did not write: {', '.join(kept[:5])}"
                  + (" ..." if len(kept) > 5 else ""), file=sys.stderr, flush=True)

    def _lock(self, folder: Path) -> None:
        import fcntl

        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = f"pid {holder['pid']} on {holder['host']}" if "pid" in holder else "another process"
            raise UserError(f"{folder} is in use by {who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "script": self.script,
                                  "since": _now()}).encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _write_record(self) -> None:
        from lineofsight.io import write_json

        if self._folder is not None:
            write_json(self._folder / RUN_RECORD, self._record)

    # ---- during and after the work ----------------------------------------------------------------

    def check_alive(self) -> None:
        """Under torchrun: stop (:class:`UserError`) when the launcher that started this worker is gone."""
        if self._parent is not None and os.getppid() != self._parent:
            raise UserError(f"the torchrun launcher (pid {self._parent}) of rank "
                            f"{self.info.rank if self.info else 0} is gone; stopping without writing more")

    def finish(self, summary: str, metrics: R | None = None, metrics_file: str | None = "metrics.json") -> R | None:
        """Write ``metrics`` to ``<out>/<metrics_file>`` (rank 0), mark run.json done with ``summary``,
        print ``summary`` on rank 0, and end the run (lock released, process group left)."""
        from lineofsight import dist

        if self.is_main:
            if metrics is not None and metrics_file and self.out is not None:
                from lineofsight.io import write_json

                write_json(self.out / metrics_file, metrics)
            if self._record:
                self._record.update(status="done", ended=_now(), summary=summary)
                self._write_record()
        dist.print0(summary)
        self._finished = True
        self.close()
        return metrics

    def close(self, error: BaseException | None = None) -> None:
        """End the run: a failure is recorded in run.json, the lock released, the process group left."""
        from lineofsight import dist

        if error is not None and not self._finished and self._record and self.is_main:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._record.update(status="failed", ended=_now(), summary=f"{type(error).__name__}: {first}")
            with contextlib.suppress(OSError):  # the failure itself may be a full or vanished disk
                self._write_record()
        self._unlock()
        dist.cleanup()


def lifecycle(script: str, outputs: Sequence[str] = (), resumable: bool = False
              ) -> Callable[[Callable[[C, Run], R]], Callable[[C], R]]:
    """Decorate ``main(cfg, run)`` into ``main(cfg)``: a fresh :class:`Run` per call, always closed."""

    def wrap(fn: Callable[[C, Run], R]) -> Callable[[C], R]:
        @functools.wraps(fn)
        def main(cfg: C) -> R:
            check_finite(cfg)
            run = Run(script, cfg, outputs=outputs, resumable=resumable)
            try:
                return fn(cfg, run)
            except BaseException as err:
                run.close(err)
                raise
            finally:
                run.close()

        return main

    return wrap
