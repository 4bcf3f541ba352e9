"""lineofsight.run: the output-folder policy, the lock, the run record, and the scripts that use them."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from lineofsight.cli import UserError
from lineofsight.run import LOCK_FILE, RUN_RECORD, lifecycle


@dataclasses.dataclass
class _Cfg:
    out: Path
    overwrite: bool = False
    resume: bool = False
    fail: bool = False


def _script(name: str = "tests/fake.py", resumable: bool = True):
    @lifecycle(name, outputs=("metrics.json", "part-*"), resumable=resumable)
    def main(cfg: _Cfg, run):
        run.setup(seed=0, device="cpu")
        resumed = run.open(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
        (run.out / "part-1").write_text("x")
        if cfg.fail:
            raise RuntimeError("boom\nsecond line")
        return run.finish("done", {"resumed": resumed})

    return main


def _record(folder: Path) -> dict:
    return json.loads((folder / RUN_RECORD).read_text())


def test_new_folder_gets_a_run_record(tmp_path):
    out = tmp_path / "a" / "b"
    assert _script()(_Cfg(out)) == {"resumed": False}
    rec = _record(out)
    assert rec["script"] == "tests/fake.py" and rec["status"] == "done" and rec["summary"] == "done"
    assert rec["config"] == {"out": str(out), "overwrite": False, "resume": False, "fail": False}
    assert rec["git_sha"] and len(rec["git_sha"]) == 40 and isinstance(rec["git_dirty"], bool)
    assert rec["versions"]["torch"] and rec["world_size"] == 1 and rec["pid"] == os.getpid()
    assert rec["started"] <= rec["ended"] and rec["command"][0] == sys.executable
    assert json.loads((out / "metrics.json").read_text()) == {"resumed": False}


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path):
    main = _script()
    main(_Cfg(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="already holds a run of tests/fake.py.*--resume to continue it or --overwrite"):
        main(_Cfg(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(_Cfg(tmp_path, resume=True)) == {"resumed": True}
    rec = _record(tmp_path)
    assert len(rec["sessions"]) == 1 and rec["sessions"][0]["status"] == "done"
    with pytest.raises(UserError, match="exclude each other"):
        main(_Cfg(tmp_path, resume=True, overwrite=True))


def test_overwrite_removes_only_what_the_script_wrote(tmp_path):
    main = _script()
    main(_Cfg(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "part-2").write_text("old part")
    assert main(_Cfg(tmp_path, overwrite=True)) == {"resumed": False}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "part-2").exists() and (tmp_path / "part-1").exists()
    assert "sessions" not in _record(tmp_path)


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_foreign_folders_are_refused_with_any_flag(tmp_path, flags):
    main = _script()
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="is not empty and holds no run record"):
        main(_Cfg(users, **flags))
    assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"]  # not even a lock file left
    other = tmp_path / "other"
    _script("tests/other.py")(_Cfg(other))
    with pytest.raises(UserError, match="holds a run of tests/other.py, not of tests/fake.py"):
        main(_Cfg(other, **flags))
    model_dir = ROOT / "data" / "toy" / "model"
    files = sorted(p.name for p in model_dir.iterdir())
    with pytest.raises(UserError):
        main(_Cfg(model_dir, **flags))
    assert sorted(p.name for p in model_dir.iterdir()) == files


@pytest.mark.parametrize("where", ["/", "home", "repo", "cwd", "above cwd"])
def test_protected_folders(tmp_path, monkeypatch, where):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    out = {"/": Path("/"), "home": Path.home(), "repo": ROOT, "cwd": Path("."), "above cwd": Path("..")}[where]
    with pytest.raises(UserError, match="refusing to write a run there"):
        _script()(_Cfg(out, overwrite=True))


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        _script()(_Cfg(tmp_path / "f"))


def test_resume_only_where_a_script_can_continue(tmp_path):
    with pytest.raises(UserError, match="cannot continue a run"):
        _script(resumable=False)(_Cfg(tmp_path / "x", resume=True))


def test_a_failed_run_is_recorded_and_releases_its_lock(tmp_path):
    main = _script()
    with pytest.raises(RuntimeError):
        main(_Cfg(tmp_path, fail=True))
    rec = _record(tmp_path)
    assert rec["status"] == "failed" and rec["summary"] == "RuntimeError: boom" and rec["ended"]
    assert main(_Cfg(tmp_path, resume=True)) == {"resumed": True}  # the lock was released


def test_a_locked_folder_names_its_holder(tmp_path):
    """A second process into a folder in use exits 2 naming this process's pid and host."""
    import socket

    @lifecycle("tests/holder.py")
    def hold(cfg, run):
        run.setup(device="cpu")
        run.open(cfg.out)
        code = (
            "import dataclasses, sys\nfrom pathlib import Path\n"
            "sys.path.insert(0, 'tests')\nfrom test_run import _Cfg, _script\nfrom lineofsight.cli import run\n"
            f"run(_script('tests/holder.py'), _Cfg, ['--out', {str(cfg.out)!r}, '--resume'])\n"
        )
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)

    proc = hold(_Cfg(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()}")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# Every script: help text for every field, and the policy through a real command line
# ---------------------------------------------------------------------------------------------

SCRIPTS = sorted(
    p for d in ("scripts", "probes", "steering", "sae") for p in (ROOT / d).rglob("*.py") if not p.name.startswith("_")
)


def _documented_fields(tree: ast.Module, name: str, classes: dict[str, ast.ClassDef]) -> dict[str, bool]:
    """{field: has a docstring} of dataclass ``name`` and its bases in the same module or lineofsight.data."""
    cls = classes[name]
    fields: dict[str, bool] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields.update(_documented_fields(tree, base.id, classes))
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            fields[node.target.id] = doc and bool(nxt.value.value.strip())
    return fields


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_field_has_help_text(script):
    tree = ast.parse(script.read_text())
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    library = ast.parse((ROOT / "lineofsight" / "data.py").read_text())
    classes.update({n.name: n for n in ast.walk(library) if isinstance(n, ast.ClassDef) and n.name not in classes})
    assert "Config" in classes, f"{script.name} has no Config dataclass"
    fields = _documented_fields(tree, "Config", classes)
    assert fields and all(fields.values()), f"fields without help text: {[f for f, ok in fields.items() if not ok]}"


def _cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    """A tiny pooled-activation cache written through the library's writer (no model needed)."""
    import torch

    from lineofsight.cache import write_activation_shard, write_cache_metadata

    cache = tmp_path_factory.mktemp("cache")
    labels = torch.tensor([0, 0, 1, 1])
    write_activation_shard(cache, 0, torch.randn(4, 1, 8), labels, torch.arange(4), ["a"] * 4, {})
    write_cache_metadata(cache, {"n_images": 4, "layers": [1], "d_model": 8, "pool": "image",
                                 "shards": ["shard-00000.safetensors"], "class_names": ["a", "b"],
                                 "class_labels": [0, 1]})
    (cache / "pairs.txt").write_text("a@b\n")
    return cache


def _vectors(cache: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return _cli(["steering/compute_steering_vectors.py", "--activations", str(cache), "--pairs",
                 str(cache / "pairs.txt"), "--out", str(out), *flags])


def _one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_overwrite_refuses_dot_and_foreign_folders_from_the_command_line(planted_cache, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    _one_line_error(_vectors(planted_cache, Path("."), "--overwrite"), "refusing to write a run there")
    _one_line_error(_vectors(planted_cache, tmp_path, "--overwrite"), "holds no run record")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    out = tmp_path / "vec"
    assert _vectors(planted_cache, out).returncode == 0
    _one_line_error(_vectors(planted_cache, out), "already holds a run of steering/compute_steering_vectors.py")
    _one_line_error(_cli(["probes/train_probe.py", "--activations", str(planted_cache), "--out", str(out),
                          "--overwrite"]), "holds a run of steering/compute_steering_vectors.py, not of")
    assert _vectors(planted_cache, out, "--overwrite").returncode == 0
    assert _record(out)["script"] == "steering/compute_steering_vectors.py"


# ---------------------------------------------------------------------------------------------
# Every script leaves a run record: the whole pipeline on a tiny model, in one process
# ---------------------------------------------------------------------------------------------


def test_every_script_writes_its_run_record(tiny_model_dir, small_world, tmp_path):
    """Each script, run on tiny inputs, leaves ``run.json`` with its name, full config, git SHA and
    status ``done`` in the folder it wrote; adding a script means adding one row here."""
    from conftest import load_script

    from lineofsight.run import jsonable

    model, world, tmp = str(tiny_model_dir), small_world, tmp_path
    (tmp / "pairs.txt").write_text("circle@square\n")
    (tmp / "q.txt").write_text("What is shown in this image?\n")
    data = world / "sharegpt4v.json"
    steps: list[tuple[str, object, callable]] = [
        ("probes/compute_image_activations.py",
         lambda m: m.Config(model=model, imagenet_dir=world / "imagenet", images_per_class=2, layers=(1, 2),
                            out=tmp / "acts"), lambda result: result),
        ("probes/train_probe.py",
         lambda m: m.Config(activations=tmp / "acts", epochs=2, out=tmp / "probes"), lambda _: tmp / "probes"),
        ("steering/compute_steering_vectors.py",
         lambda m: m.Config(activations=tmp / "acts", pairs=tmp / "pairs.txt", out=tmp / "vec"), lambda r: r),
        ("steering/steering_rollouts.py",
         lambda m: m.Config(vectors=tmp / "vec", layer=1, model=model, imagenet_dir=world / "imagenet",
                            split="train", k=(0.0,), images_per_pair=1, prompts=tmp / "q.txt", max_new_tokens=2,
                            out=tmp / "roll"), lambda r: r.parent),
        ("steering/eval_steering.py",
         lambda m: m.Config(vectors=tmp / "vec", layer=(1,), model=model, imagenet_dir=world / "imagenet",
                            split="train", data=data, k=(0.0,), images_per_pair=1, n_captions=2, out=tmp / "eval"),
         lambda _: tmp / "eval"),
        ("sae/cache_activations.py",
         lambda m: m.Config(model=model, data=data, layers=(1,), limit=4, out=tmp / "tok"), lambda r: r),
        ("sae/sae-trainer.py",
         lambda m: m.Config(activations=tmp / "tok", layer=(1,), expansion=(2,), batch_size=64, total_tokens=256,
                            out=tmp / "sae"), lambda _: tmp / "sae"),
        ("sae/evaluation/eval_sae.py",
         lambda m: m.Config(sae=tmp / "sae", model=model, data=data, offset=4, limit=2, out=tmp / "sae-eval"),
         lambda _: tmp / "sae-eval"),
        ("sae/evaluation/modality.py",
         lambda m: m.Config(saes=(tmp / "sae",), model=model, data=data, offset=4, limit=2, out=tmp / "mod"),
         lambda _: tmp / "mod"),
        ("sae/approximate_steering_vectors.py",
         lambda m: m.Config(vectors=tmp / "vec", sae=tmp / "sae", steps=2, out=tmp / "approx"),
         lambda _: tmp / "approx"),
        ("scripts/eval_toy.py",
         lambda m: m.Config(model=model, world_dir=world, n_per_class=1, out=tmp / "toy-eval"),
         lambda _: tmp / "toy-eval"),
    ]
    for script, make_cfg, folder_of in steps:
        module = load_script(script)
        cfg = make_cfg(module)
        if script == "sae/sae-trainer.py":  # the token cache folder, from the step before
            cfg.activations = next((tmp / "tok").glob("tokens-*"))
        if script in ("probes/train_probe.py", "steering/compute_steering_vectors.py"):
            cfg.activations = next((tmp / "acts").glob("acts-*"))
        folder = Path(folder_of(module.main(cfg)))
        rec = _record(folder)
        assert rec["script"] == script and rec["status"] == "done", (script, rec)
        assert rec["config"] == jsonable(cfg), script
        assert rec["git_sha"] and len(rec["git_sha"]) == 40, script
        assert rec["summary"] and rec["ended"], script
        assert not (folder / LOCK_FILE).exists() or _lock_is_free(folder), script


def _lock_is_free(folder: Path) -> bool:
    import fcntl

    with open(folder / LOCK_FILE) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True
