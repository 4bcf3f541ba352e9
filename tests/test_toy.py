"""The embedded default: a deterministic world and a toy LLaVA-NeXT that reads its images."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

from lineofsight.models import format_prompt, image_token_mask, layer_names, load_vlm
from lineofsight.toy import CLASSES, TOY_MODEL_DIR, evaluate_toy, generate_world, heldout_samples


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_and_in_real_layouts(tmp_path):
    kw = dict(seed=3, n_train_per_class=2, n_val_per_class=1, n_captions=4)
    a, b = generate_world(tmp_path / "a", **kw), generate_world(tmp_path / "b", **kw)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(generate_world(tmp_path / "c", **{**kw, "seed": 4})) != _tree_digest(a)
    import json

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
    the bar of the embedded default, 95 % captions and forced choice, 90 % yes/no."""
    model, processor = load_vlm("toy")
    result = evaluate_toy(model, processor, heldout_samples(20, seed=11), batch_size=80, seed=11)
    assert result["n_images"] == 20 * len(CLASSES)
    assert result["caption_acc"] >= 0.95, result
    assert result["forced_choice_acc"] >= 0.95, result
    assert result["yesno_acc"] >= 0.90, result


def test_tiny_training_lowers_the_loss(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/train_toy_vlm.py", "--tiny", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, end = map(float, re.search(r"stage 2 done in .*?loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert end < 0.5 * start, (start, end)
    assert (tmp_path / "m" / "config.json").is_file()


def test_default_world_is_generated_on_demand(tmp_path, monkeypatch):
    """Scripts whose defaults point into the toy world work on a fresh checkout (world git-ignored)."""
    from lineofsight import toy

    monkeypatch.setattr(toy, "TOY_WORLD_DIR", tmp_path / "world")
    toy.ensure_toy_world(tmp_path / "elsewhere" / "x.json", None)
    assert not (tmp_path / "world").exists()
    toy.ensure_toy_world(tmp_path / "world" / "sharegpt4v.json")
    assert (tmp_path / "world" / "world.json").is_file() and (tmp_path / "world" / "sharegpt4v.json").is_file()
