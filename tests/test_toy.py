"""The embedded default: a deterministic world and a toy LLaVA-NeXT that reads its images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script

from lineofsight.cli import UserError
from lineofsight.models import format_prompt, image_token_mask, layer_names, load_vlm
from lineofsight.paths import TOY_MODEL_DIR
from lineofsight.prompts import MC_LETTERS, multiple_choice
from lineofsight.toy import (
    _RGB,
    CLASSES,
    MC_SUBJECTS,
    evaluate_toy,
    generate_world,
    heldout_samples,
    make_samples,
    mc_items,
    mc_task,
)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_and_in_real_layouts(tmp_path):
    kw = dict(seed=3, n_train_per_class=2, n_val_per_class=1, n_captions=4, n_benchmark=16)
    a, b = generate_world(tmp_path / "a", **kw), generate_world(tmp_path / "b", **kw)
    assert _tree_digest(a) == _tree_digest(b)  # the benchmark datasets included, bit for bit
    assert {p.name for p in (a / "benchmarks").iterdir()} == {"aokvqa", "mmmu_pro"}
    assert _tree_digest(generate_world(tmp_path / "c", **{**kw, "seed": 4})) != _tree_digest(a)
    index = json.loads((a / "imagenet" / "imagenet_class_index.json").read_text())
    assert [index[str(i)][1] for i in range(len(index))] == list(CLASSES) and len(CLASSES) >= 8
    for split, n in (("train", 2), ("val", 1)):
        for wnid, _ in index.values():
            assert len(list((a / "imagenet" / split / wnid).glob("*.png"))) == n
    records = json.loads((a / "sharegpt4v.json").read_text())
    assert len(records) == 4
    rec = records[0]
    assert set(rec) >= {"id", "image", "conversations"} and (a / rec["image"]).is_file()
    assert rec["conversations"][0]["from"] == "human" and rec["conversations"][0]["value"].startswith("<image>\n")
    assert any(c in rec["conversations"][1]["value"].split() for c in CLASSES)
    assert all("@" in line for line in (a / "class_pairs.txt").read_text().splitlines())
    before = (a / "world.json").stat().st_mtime_ns
    generate_world(tmp_path / "a", **kw)  # same config: a no-op
    assert (a / "world.json").stat().st_mtime_ns == before


# The columns and feature types of the real datasets (their hub dataset_info), written out here as the reference.
AOKVQA_FEATURES = {
    "question_id": "Value('string')",
    "image": "Image(mode=None, decode=True)",
    "question": "Value('string')",
    "choices": "List(Value('string'))",
    "correct_choice_idx": "Value('int8')",
    "direct_answers": "List(Value('string'))",
    "difficult_direct_answer": "Value('bool')",
    "rationales": "List(Value('string'))",
}
MMMU_PRO_FEATURES = {
    "id": "Value('string')",
    "question": "Value('string')",
    "options": "Value('string')",
    "explanation": "Value('string')",
    **{f"image_{i}": "Image(mode=None, decode=True)" for i in range(1, 8)},
    "image_type": "Value('string')",
    "answer": "Value('string')",
    "topic_difficulty": "Value('string')",
    "subject": "Value('string')",
}


def _shape_rgb(image, mask):
    """Mean colour of the pixels the shape covers fully."""
    import numpy as np

    return np.asarray(image, dtype=float)[mask > 0.99].mean(0)


def test_world_benchmarks_have_the_hub_schemas_and_right_answers(small_world):
    """The toy's multiple-choice benchmarks load with datasets.load_from_disk, in exactly the columns and feature
    types of HuggingFaceM4/A-OKVQA and MMMU/MMMU_Pro "standard (4 options)"; every answer names what the
    image shows (its pixels are the rendered sample's, and the colour answer is the shape pixels' nearest colour)."""
    import ast

    import datasets
    import numpy as np

    aokvqa = datasets.load_from_disk(str(small_world / "benchmarks" / "aokvqa"))
    mmmu = datasets.load_from_disk(str(small_world / "benchmarks" / "mmmu_pro"))
    assert list(aokvqa) == ["validation"] and list(mmmu) == ["test"]
    aokvqa, mmmu = aokvqa["validation"], mmmu["test"]
    assert {k: repr(v) for k, v in aokvqa.features.items()} == AOKVQA_FEATURES
    assert {k: repr(v) for k, v in mmmu.features.items()} == MMMU_PRO_FEATURES
    assert list(aokvqa.features) == list(AOKVQA_FEATURES) and list(mmmu.features) == list(MMMU_PRO_FEATURES)
    assert len(aokvqa) == len(mmmu) == 96
    subjects = list(mmmu["subject"])
    assert sorted(set(subjects)) == sorted(MC_SUBJECTS) and subjects.count("Shape") == 48

    shape_question = MC_SUBJECTS["Shape"][0]
    for row, sample in zip(aokvqa, make_samples(12, 0, "benchmark/aokvqa")):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(sample.image))
        assert row["question"] == shape_question and len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["choices"][row["correct_choice_idx"]] == sample.cls and row["direct_answers"][0] == sample.cls
    samples = make_samples(6, 0, "benchmark/mmmu_pro")
    for k, row in enumerate(mmmu):
        sample = samples[k // 2]  # a shape item, then a colour item, per image
        options = ast.literal_eval(row["options"])
        assert row["options"] == repr(options) and len(set(options)) == 4 and all(isinstance(o, str) for o in options)
        assert np.array_equal(np.asarray(row["image_1"]), np.asarray(sample.image))
        assert all(row[f"image_{i}"] is None for i in range(2, 8))
        assert row["question"] == MC_SUBJECTS[row["subject"]][0] and row["answer"] in MC_LETTERS[:4]
        picked = options[MC_LETTERS.index(row["answer"])]
        if row["subject"] == "Shape":
            assert picked == sample.cls
        else:
            rgb = _shape_rgb(row["image_1"], sample.mask)
            assert picked == sample.colour == min(_RGB, key=lambda c: np.abs(rgb - _RGB[c]).sum())
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_world(small_world.parent / "bad", n_benchmark=24)


def test_toy_model_answers_multiple_choice():
    """The committed toy model answers the lettered multiple choice (the prompt of lineofsight.prompts) about fresh
    images with the right letter: one batched forward, 32 items, shape and colour, 90 % each (eval_toy's bar)."""
    model, processor = load_vlm("toy")
    items = mc_items(heldout_samples(2, seed=12))
    assert len(items) == 32 and items[0].prompt == multiple_choice(items[0].question, items[0].options)
    tok = processor.tokenizer
    tok.padding_side = "left"
    inputs = processor(text=[format_prompt(processor, it.prompt) for it in items],
                       images=[it.sample.image for it in items], return_tensors="pt", padding=True)
    with torch.no_grad():
        next_B = model(**inputs).logits[:, -1].argmax(-1)
    letters = tok.convert_tokens_to_ids([it.letter.lower() for it in items])
    hits = [int(n) == t for n, t in zip(next_B, letters)]
    for subject in MC_SUBJECTS:
        of_subject = [h for h, it in zip(hits, items) if it.subject == subject]
        assert sum(of_subject) >= 0.9 * len(of_subject), (subject, sum(of_subject), len(of_subject))


def test_toy_model_loads_offline_and_roundtrips_bit_exactly(tmp_path):
    model, processor = load_vlm("toy")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert len(layer_names(model)) == model.config.text_config.num_hidden_layers
    assert format_prompt(processor, "Hi?") == "[INST] <image>\nHi? [/INST]"
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, again_proc = load_vlm(str(tmp_path))
    ref, new = model.state_dict(), again.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    sample = heldout_samples(1)[0]
    inputs = processor(text=[format_prompt(processor, "What is shown in this image?")], images=[sample.image],
                       return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    assert sum(p.numel() for p in model.parameters()) * 4 < 8e6  # small enough to commit
    assert (TOY_MODEL_DIR / "model.safetensors").stat().st_size < 8e6


def test_toy_processor_counts_match_model_for_several_sizes():
    model, processor = load_vlm("toy")
    from PIL import Image

    prompt = format_prompt(processor, "What is shown in this image?")
    for size in [(64, 64), (48, 80), (100, 40), (32, 32), (130, 70)]:
        inputs = processor(text=[prompt], images=[Image.new("RGB", size, (90, 30, 200))], return_tensors="pt")
        with torch.no_grad():
            model(**inputs)  # raises if image features and image tokens disagree
        assert image_token_mask(inputs["input_ids"], model).sum() > 0


def test_toy_model_meets_its_quality_bar():
    """Fresh held-out images the model never saw (a stream neither training nor the world uses):
    the bar of the embedded default, 95 % captions and forced choice, 90 % yes/no (multiple choice: see
    test_toy_model_answers_multiple_choice)."""
    model, processor = load_vlm("toy")
    result = evaluate_toy(model, processor, heldout_samples(20, seed=11), batch_size=80, seed=11)
    assert result["n_images"] == 20 * len(CLASSES)
    assert result["caption_acc"] >= 0.95, result
    assert result["forced_choice_acc"] >= 0.95, result
    assert result["yesno_acc"] >= 0.90, result


def _train_tiny(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "scripts/train_toy_vlm.py", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_tiny_training_lowers_the_loss(tmp_path):
    proc = _train_tiny(tmp_path / "m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, end = map(float, re.search(r"stage 2 done in .*?loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert end < 0.5 * start, (start, end)
    script = load_script("scripts/train_toy_vlm.py")
    written = {p.name for p in (tmp_path / "m").iterdir()} - {".lock"}
    assert written == {*script.MODEL_FILES, "training.json", "run.json"}, written  # no temp folder left
    record = json.loads((tmp_path / "m" / "run.json").read_text())
    assert record["script"] == "scripts/train_toy_vlm.py" and record["status"] == "done"
    assert record["config"]["tiny"] is True and record["config"]["out"] == str(tmp_path / "m")
    assert re.fullmatch(r"[0-9a-f]{40}", record["git_sha"]) and "torch" in record["versions"]
    training = json.loads((tmp_path / "m" / "training.json").read_text())
    assert set(training["metrics"]) == {"n_images", "caption_acc", "forced_choice_acc", "yesno_acc",
                                        *(f"{mc_task(subject)}_acc" for subject in MC_SUBJECTS)}
    load_vlm(str(tmp_path / "m"))  # the folder is a model folder like any other


def test_tiny_training_refuses_a_folder_it_did_not_write(tmp_path):
    """A folder without a run record (a model someone saved, user files) is never written into."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = _tree_digest(out)
    proc = _train_tiny(out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no run record" in lines[0], proc.stderr
    assert _tree_digest(out) == before and {p.name for p in out.iterdir()} == {"config.json"}


def test_eval_toy_writes_a_run_folder(tmp_path, small_world):
    """eval_toy writes eval.json + run.json (config, git SHA) and replaces only its own run."""
    script = load_script("scripts/eval_toy.py")
    cfg = script.Config(world_dir=small_world, n_per_class=1, n_examples=1, out=tmp_path / "toy")
    result = script.main(cfg)
    saved = json.loads((tmp_path / "toy" / "eval.json").read_text())
    assert saved["n_images"] == result["n_images"] == len(CLASSES) and "provenance" not in saved
    assert saved["caption_acc"] == result["caption_acc"] and saved["bar"] == script.BAR
    record = json.loads((tmp_path / "toy" / "run.json").read_text())
    assert record["script"] == "scripts/eval_toy.py" and record["status"] == "done"
    assert record["config"]["n_per_class"] == 1 and record["config"]["world_dir"] == str(small_world)
    assert re.fullmatch(r"[0-9a-f]{40}", record["git_sha"]) and isinstance(record["git_dirty"], bool)
    with pytest.raises(UserError, match="already holds a run"):
        script.main(cfg)
    (tmp_path / "toy" / "notes.txt").write_text("mine")
    (tmp_path / "toy" / "eval.json").unlink()
    script.main(dataclasses.replace(cfg, overwrite=True))
    assert (tmp_path / "toy" / "notes.txt").read_text() == "mine" and (tmp_path / "toy" / "eval.json").is_file()
    assert json.loads((tmp_path / "toy" / "run.json").read_text())["config"]["overwrite"] is True


def test_default_world_is_generated_on_demand(tmp_path, monkeypatch):
    """Scripts whose defaults point into the toy world work on a fresh checkout (world git-ignored)."""
    from lineofsight import paths, toy

    monkeypatch.setattr(paths, "TOY_WORLD_DIR", tmp_path / "world")
    toy.ensure_toy_world(tmp_path / "elsewhere" / "x.json", None)
    assert not (tmp_path / "world").exists()
    toy.ensure_toy_world(tmp_path / "world" / "sharegpt4v.json")
    assert (tmp_path / "world" / "world.json").is_file() and (tmp_path / "world" / "sharegpt4v.json").is_file()
