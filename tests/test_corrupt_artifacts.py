"""Broken artifacts are one-line errors naming the file, never tracebacks.

One row per corruption: which artifact, which of its files, how it is broken, which reader reads
it, and what the :class:`UserError` must say. Every artifact is written by the library's own
writer (no model needed), copied per row, broken, and read back. At the end, two scripts run
end to end on broken files: exit code 2, one ``error:`` line, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lineofsight.cli import UserError

ROOT = Path(__file__).resolve().parent.parent
D_MODEL = 8

# ---------------------------------------------------------------------------------------------
# The artifacts, each written once per module by the library's writer
# ---------------------------------------------------------------------------------------------


def _acts_cache(folder: Path) -> None:
    from lineofsight.cache import write_activation_shard, write_cache_metadata

    labels = torch.tensor([0, 0, 1, 1])
    write_activation_shard(folder, 0, torch.randn(4, 2, D_MODEL), labels, torch.arange(4), ["a.png"] * 4, {})
    write_cache_metadata(folder, {"n_images": 4, "layers": [1, 2], "d_model": D_MODEL, "pool": "image",
                                  "shards": ["shard-00000.safetensors"], "class_names": ["a", "b"],
                                  "class_labels": [0, 1]})
    (folder / "pairs.txt").write_text("a@b\n")


def _token_cache(folder: Path) -> None:
    from lineofsight.cache import write_cache_metadata, write_token_shard
    from lineofsight.harvest import TokenBatch

    n = 6
    batch = TokenBatch(torch.randn(n, 1, D_MODEL), torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.uint8),
                       torch.arange(n), torch.arange(n), torch.zeros(n, dtype=torch.long))
    write_token_shard(folder, 0, batch, {})
    write_cache_metadata(folder, {"layers": [1], "shards": ["shard-00000.safetensors"], "d_model": D_MODEL,
                                  "key": {"model": "toy"}})


def _vectors(folder: Path) -> None:
    from lineofsight.steering import save_vectors

    save_vectors(folder, {("a", "b", 1): torch.randn(D_MODEL), ("b", "a", 1): torch.randn(D_MODEL)},
                 {"method": "diff"})


def _sae(folder: Path) -> None:
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_in=D_MODEL, d_sae=16, layer=1)).save(folder)


def _probes(folder: Path) -> None:
    from lineofsight.probes import save_pair_probes, save_probe

    probe = {"weight": torch.randn(2, D_MODEL), "bias": torch.zeros(2), "mean": torch.zeros(D_MODEL),
             "std": torch.ones(D_MODEL)}
    save_probe(folder, 1, probe, ["a", "b"], "image")
    save_pair_probes(folder, 1, {"a@b": torch.randn(D_MODEL)})


def _rollouts(folder: Path) -> None:
    record = {"src": "a", "tgt": "b", "layer": 1, "k": 2.5, "prompt_id": 0, "prompt": "q", "image": "x.png",
              "positions": "image", "text": "a b", "n_tokens": 2}
    (folder / "rollouts.jsonl").write_text("".join(json.dumps({**record, "k": k}) + "\n" for k in (0.0, 1.0, 2.0)))


WRITERS = {"acts": _acts_cache, "tokens": _token_cache, "vectors": _vectors, "sae": _sae, "probes": _probes,
           "rollouts": _rollouts}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    for name, write in WRITERS.items():
        (root / name).mkdir()
        write(root / name)
    return {name: root / name for name in WRITERS}


# ---------------------------------------------------------------------------------------------
# How a file is broken
# ---------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def text(content: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return write


def edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))

    return write


def drop(key: str) -> Callable[[Path], None]:
    return edit_json(lambda obj: obj.pop(key))


def put(key: str, value) -> Callable[[Path], None]:
    return edit_json(lambda obj: obj.__setitem__(key, value))


def resave(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Callable[[Path], None]:
    """Replace a safetensors file by a valid one holding other tensors (wrong shapes, keys, metadata)."""

    def write(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=meta)

    return write


def replace_line(n: int, content: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        lines = path.read_bytes().split(b"\n")
        lines[n - 1] = content
        path.write_bytes(b"\n".join(lines))

    return write


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------


def read_acts(folder: Path):
    from lineofsight.cache import read_activation_cache

    return read_activation_cache(folder)


def read_tokens(folder: Path):
    from lineofsight.cache import read_token_cache
    from lineofsight.harvest import TOKEN_TYPES

    return read_token_cache(folder, None, TOKEN_TYPES)


def read_vectors(folder: Path):
    from lineofsight.steering import load_vectors

    return load_vectors(folder, 1)


def read_sae(folder: Path):
    from lineofsight.sae import load_sae

    return load_sae(folder, "cpu")


def read_probe(folder: Path):
    from lineofsight.probes import load_probe

    return load_probe(folder, 1)


def read_pair_probes(folder: Path):
    from lineofsight.probes import load_pair_probes

    return load_pair_probes(folder, 1)


def read_rollouts(folder: Path):
    from lineofsight.steering import read_rollouts

    return read_rollouts(folder / "rollouts.jsonl")


SHARD = "shard-00000.safetensors"
NOT_SAFETENSORS = "is truncated or not a safetensors file"

# (artifact, file, how it is broken, reader, what the error must say (regex))
CASES = [
    # pooled-activation cache (probes/compute_image_activations.py -> train_probe, compute_steering_vectors)
    ("acts", SHARD, truncate, read_acts, rf"activation-cache shard .*{SHARD} {NOT_SAFETENSORS} \(incomplete metadata"),
    ("acts", SHARD, empty, read_acts, rf"{SHARD} {NOT_SAFETENSORS} \(header too small\)"),
    ("acts", SHARD, text("hello"), read_acts, rf"{SHARD} {NOT_SAFETENSORS}"),
    ("acts", SHARD, delete, read_acts, rf"activation-cache shard .*{SHARD} does not exist"),
    ("acts", SHARD, resave({"acts": torch.zeros(4, 3, D_MODEL), "labels": torch.zeros(4)}, {"paths": "[]"}),
     read_acts, r"'acts' has shape \[4, 3, 8\], expected \[images, 2 layers, d_model\]"),
    ("acts", SHARD, resave({"acts": torch.zeros(4, 2, D_MODEL)}, {"paths": "[]"}), read_acts,
     rf"{SHARD}: File does not contain tensor labels"),
    ("acts", SHARD, resave({"acts": torch.zeros(4, 2, D_MODEL), "labels": torch.zeros(4)}), read_acts,
     r"has no 'paths' in its header metadata"),
    ("acts", SHARD, resave({"acts": torch.zeros(4, 2, D_MODEL), "labels": torch.zeros(4)}, {"paths": "[\"a\"]"}),
     read_acts, r"4 activation rows but 4 labels and 1 paths"),
    ("acts", "metadata.json", text("{not json"), read_acts,
     r"activation-cache metadata .*metadata.json is not valid JSON \(.* at line 1 column 2\)"),
    ("acts", "metadata.json", text(b'{"shards": "\xff\xfe"}'), read_acts, r"metadata.json is not UTF-8 text \(byte 0xff on line 1\)"),
    ("acts", "metadata.json", text("[1, 2]"), read_acts, r"metadata.json should be a JSON object, not a list"),
    ("acts", "metadata.json", drop("layers"), read_acts, r"metadata.json has no 'layers' entry"),
    ("acts", "metadata.json", drop("class_names"), read_acts, r"metadata.json has no 'class_names' entry"),
    ("acts", "metadata.json", put("layers", ["one"]), read_acts, r"'layers' should be a list of integers, not a list holding a string \('one'\)"),
    ("acts", "metadata.json", put("shards", "shard-00000.safetensors"), read_acts,
     r"'shards' should be a list of strings, not a string"),
    ("acts", "metadata.json", put("shards", ["../../elsewhere.safetensors"]), read_acts,
     r"lists a shard '../../elsewhere.safetensors' that is not a file name in the cache"),
    ("acts", "metadata.json", put("class_labels", [0]), read_acts, r"'class_names' and 'class_labels' differ"),
    ("acts", "metadata.json", put("class_labels", [0, 5]), read_acts,
     r"hold labels \[1\] that metadata.json's 'class_labels' do not list"),
    # token cache (sae/cache_activations.py -> sae/sae-trainer.py)
    ("tokens", SHARD, truncate, read_tokens, rf"token-cache shard .*{SHARD} {NOT_SAFETENSORS}"),
    ("tokens", SHARD, empty, read_tokens, rf"token-cache shard .*{SHARD} {NOT_SAFETENSORS}"),
    ("tokens", SHARD, resave({"acts": torch.zeros(6, D_MODEL), "token_type": torch.zeros(6, dtype=torch.uint8)}),
     read_tokens, r"'acts' has shape \[6, 8\]"),
    ("tokens", "metadata.json", drop("key"), read_tokens, r"token-cache metadata .* has no 'key' entry"),
    ("tokens", "metadata.json", text(""), read_tokens, r"metadata.json is not valid JSON \(Expecting value"),
    ("tokens", "metadata.json", put("layers", []), read_tokens, r"metadata.json lists no layers"),
    # steering vectors (compute_steering_vectors.py -> steering_rollouts.py, eval_steering.py, approximate_...)
    ("vectors", "vectors.safetensors", truncate, read_vectors, rf"steering vectors .*vectors.safetensors {NOT_SAFETENSORS}"),
    ("vectors", "vectors.safetensors", empty, read_vectors, rf"vectors.safetensors {NOT_SAFETENSORS} \(header too small"),
    ("vectors", "vectors.safetensors", delete, read_vectors, r"steering vectors .*vectors.safetensors does not exist"),
    ("vectors", "vectors.safetensors", resave({"a@b/2": torch.zeros(D_MODEL)}), read_vectors,
     r"hold no vector for layer 1, which vectors.json lists"),
    ("vectors", "vectors.safetensors", resave({"a@b/1": torch.zeros(3, D_MODEL)}), read_vectors,
     r"a@b/1 has shape \[3, 8\] .*expected \[8\] floats"),
    ("vectors", "vectors.safetensors", resave({"a@b/1": torch.zeros(D_MODEL), "b@a/1": torch.zeros(3)}), read_vectors,
     r"b@a/1 has shape \[3\] .*expected \[8\] floats \(d_model in vectors.json\)"),
    ("vectors", "vectors.json", text("vectors!"), read_vectors, r"steering-vector index .*vectors.json is not valid JSON"),
    ("vectors", "vectors.json", text("null"), read_vectors, r"vectors.json should be a JSON object, not null"),
    ("vectors", "vectors.json", drop("layers"), read_vectors, r"vectors.json has no 'layers' entry"),
    ("vectors", "vectors.json", drop("pairs"), read_vectors, r"vectors.json has no 'pairs' entry"),
    ("vectors", "vectors.json", put("d_model", "8"), read_vectors, r"'d_model' should be an integer, not a string"),
    ("vectors", "vectors.json", put("layers", "1"), read_vectors, r"'layers' should be a list of integers, not a string"),
    ("vectors", "vectors.json", put("pairs", ["a-b"]), read_vectors, r"vectors.json lists a pair that is not of the form src@tgt: 'a-b'"),
    ("vectors", "vectors.json", put("d_model", 9), read_vectors, r"has shape \[8\] .*expected \[9\] floats"),
    ("vectors", "vectors.json", text(b"\x00\x9f{}"), read_vectors, r"vectors.json is not UTF-8 text"),
    # SAE folder (sae/sae-trainer.py -> evaluation, approximate_steering_vectors, train_probe --features sae)
    ("sae", "sae.safetensors", truncate, read_sae, rf"--sae: SAE weights .*sae.safetensors {NOT_SAFETENSORS}"),
    ("sae", "sae.safetensors", empty, read_sae, rf"sae.safetensors {NOT_SAFETENSORS} \(header too small"),
    ("sae", "sae.safetensors", resave({"W_enc": torch.zeros(D_MODEL, 16)}), read_sae,
     r"do not fit cfg.json \(d_in 8, d_sae 16\): missing W_dec, b_dec, b_enc"),
    ("sae", "cfg.json", put("d_in", 9), read_sae,
     r"do not fit cfg.json \(d_in 9, d_sae 16\): W_dec is \[16, 8\], expected \[16, 9\]"),
    ("sae", "cfg.json", put("d_sae", 32), read_sae, r"W_dec is \[16, 8\], expected \[32, 8\]"),
    ("sae", "cfg.json", text("[8, 16]"), read_sae, r"--sae: SAE config .*cfg.json should be a JSON object, not a list"),
    ("sae", "cfg.json", text("{d_in: 8}"), read_sae, r"cfg.json is not valid JSON"),
    ("sae", "cfg.json", drop("d_sae"), read_sae, r"not a valid SAE config: it has no 'd_sae'"),
    ("sae", "cfg.json", put("d_in", "eight"), read_sae, r"'d_in' is 'eight', not an integer"),
    ("sae", "cfg.json", put("act_scale", None), read_sae, r"'act_scale' is None, not a number"),
    ("sae", "cfg.json", put("activation", "gelu"), read_sae, r"activation must be one of relu, topk, batchtopk"),
    ("sae", "cfg.json", delete, read_sae, r"--sae: .* is not an SAE folder"),
    # probes (train_probe.py -> compute_steering_vectors.py --method probe)
    ("probes", "probe_layer1.safetensors", truncate, read_probe, rf"probe .*probe_layer1.safetensors {NOT_SAFETENSORS}"),
    ("probes", "probe_layer1.safetensors", resave({"weight": torch.zeros(2, D_MODEL)}), read_probe,
     r"holds no tensor 'bias', 'mean', 'std'"),
    ("probes", "probe_layer1.json", drop("class_names"), read_probe, r"probe description .* has no 'class_names' entry"),
    ("probes", "probe_layer1.json", put("class_names", ["a", "b", "c"]), read_probe,
     r"weight has shape \[2, 8\], but probe_layer1.json \(3 classes, d_model 8\) says \[3, 8\]"),
    ("probes", "probe_layer1.json", text("}"), read_probe, r"probe_layer1.json is not valid JSON"),
    ("probes", "pair_probes_layer1.safetensors", truncate, read_pair_probes,
     rf"pair probes .*pair_probes_layer1.safetensors {NOT_SAFETENSORS}"),
    ("probes", "pair_probes_layer1.safetensors", resave({"a@b": torch.zeros(2, 2)}), read_pair_probes,
     r"should hold one vector \[d_model\] per pair"),
    # rollouts (steering_rollouts.py -> eval_steering.py --rollouts, --resume)
    ("rollouts", "rollouts.jsonl", replace_line(2, b"{\"src\": "), read_rollouts,
     r"rollouts.jsonl:2 is not a rollout record \(not valid JSON"),
    ("rollouts", "rollouts.jsonl", replace_line(2, b"[1, 2]"), read_rollouts, r"rollouts.jsonl:2 is not a rollout record \(a JSON list"),
    ("rollouts", "rollouts.jsonl", replace_line(2, b'{"src": "a", "tgt": "b", "layer": 1}'), read_rollouts,
     r"rollouts.jsonl:2 is an incomplete rollout record \(no k, prompt_id, image, positions, text\)"),
    ("rollouts", "rollouts.jsonl", replace_line(1, json.dumps(
        {"src": "a", "tgt": "b", "layer": 1, "k": "big", "prompt_id": 0, "image": "x", "positions": "image",
         "text": ""}).encode()), read_rollouts, r"rollouts.jsonl:1 is not a rollout record \(k='big' of the wrong type\)"),
    ("rollouts", "rollouts.jsonl", replace_line(3, b'{"text": "caf\xe9"}'), read_rollouts, r"rollouts.jsonl:3 is not UTF-8 text"),
    ("rollouts", "rollouts.jsonl", delete, read_rollouts, r"rollouts file .*rollouts.jsonl does not exist"),
]


CASE_IDS = [f"{i:02d}-{artifact}-{file.split('.')[0]}-{how.__qualname__.split('.')[0]}"
            for i, (artifact, file, how, _, _) in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_broken_artifact_is_a_one_line_error_naming_the_file(case, artifacts, tmp_path):
    artifact, file, how, reader, message = case
    folder = tmp_path / artifact
    shutil.copytree(artifacts[artifact], folder)
    how(folder / file)
    with pytest.raises(UserError, match=message) as err:
        reader(folder)
    assert "\n" not in str(err.value)
    assert file.split("/")[-1] in str(err.value) or "not an SAE folder" in str(err.value)


@pytest.mark.parametrize("artifact, reader", [("acts", read_acts), ("tokens", read_tokens), ("vectors", read_vectors),
                                              ("sae", read_sae), ("probes", read_probe), ("probes", read_pair_probes),
                                              ("rollouts", read_rollouts)])
def test_intact_artifacts_read_back(artifact, reader, artifacts):
    """The rows above break files that read back fine as written."""
    assert reader(artifacts[artifact]) is not None


def test_hand_written_vectors_without_d_model(artifacts, tmp_path):
    """A vectors.json written by hand may lack d_model: the vectors of a layer must then agree on a width."""
    folder = tmp_path / "vec"
    shutil.copytree(artifacts["vectors"], folder)
    drop("d_model")(folder / "vectors.json")
    assert sorted(read_vectors(folder)[0]) == ["a@b", "b@a"]
    resave({"a@b/1": torch.zeros(D_MODEL), "b@a/1": torch.zeros(3)})(folder / "vectors.safetensors")
    with pytest.raises(UserError, match=r"b@a/1 has shape \[3\] .*expected \[8\] floats \(the width of the others\)"):
        read_vectors(folder)


def test_sae_error_keeps_its_type_for_library_callers(artifacts, tmp_path):
    from lineofsight.sae import SAEError, SparseAutoencoder

    shutil.copytree(artifacts["sae"], tmp_path / "sae")
    truncate(tmp_path / "sae" / "sae.safetensors")
    with pytest.raises(SAEError, match="truncated or not a safetensors file"):
        SparseAutoencoder.load(tmp_path / "sae")


def test_rollouts_torn_last_line_and_blank_lines_are_fine(artifacts, tmp_path):
    from lineofsight.steering import read_rollouts

    path = tmp_path / "rollouts.jsonl"
    lines = (artifacts["rollouts"] / "rollouts.jsonl").read_text().splitlines()
    path.write_text(lines[0] + "\n\n   \n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    assert [r["k"] for r in read_rollouts(path)] == [0.0, 1.0]
    path.write_bytes(lines[0].encode() + b"\n" + b'{"text": "caf\xe9')  # a torn write may cut a character too
    assert len(read_rollouts(path)) == 1


# ---------------------------------------------------------------------------------------------
# End to end: the scripts turn these errors into exit code 2 and one line
# ---------------------------------------------------------------------------------------------


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                          **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_compute_steering_vectors_on_a_truncated_shard(artifacts, tmp_path):
    shutil.copytree(artifacts["acts"], tmp_path / "acts")
    truncate(tmp_path / "acts" / SHARD)
    proc = _cli("steering/compute_steering_vectors.py", "--activations", str(tmp_path / "acts"), "--pairs",
                str(tmp_path / "acts" / "pairs.txt"), "--out", str(tmp_path / "vec"))
    assert_one_line_error(proc, f"{SHARD} is truncated or not a safetensors file")
    assert not (tmp_path / "vec").exists()


def test_eval_steering_on_corrupt_vectors(artifacts, small_world, tmp_path):
    shutil.copytree(artifacts["vectors"], tmp_path / "vec")
    (tmp_path / "vec" / "vectors.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    proc = _cli("steering/eval_steering.py", "--vectors", str(tmp_path / "vec"), "--layer", "1",
                "--imagenet-dir", str(small_world / "imagenet"), "--data", str(small_world / "sharegpt4v.json"),
                "--out", str(tmp_path / "eval"))
    assert_one_line_error(proc, "vectors.safetensors is truncated or not a safetensors file")
    assert not (tmp_path / "eval").exists()
