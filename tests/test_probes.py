"""probes/: pooled activations are exact, batching and resumption change nothing, bad data is counted."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, images, load_script

from lineofsight.cache import read_activation_cache
from lineofsight.cli import UserError
from lineofsight.models import image_token_mask

extract = load_script("probes/compute_image_activations.py")
probe = load_script("probes/train_probe.py")


def _cfg(world, out, **kw):
    base = dict(imagenet_dir=world / "imagenet", out=out, images_per_class=3, batch_size=4, shard_size=5)
    return extract.Config(**{**base, **kw})


@pytest.mark.parametrize("pool", ["image", "all", "last"])
def test_pooled_equals_hand_computation(tiny_models, pool):
    model, processor = tiny_models("next-mistral")
    processor.tokenizer.padding_side = "left"
    ims = images([(64, 64), (48, 80), (100, 40)])
    cfg = extract.Config(model="unused", pool=pool, prompt="<image>")
    sites = [f"model.language_model.layers.{i}" for i in range(3)]
    got_BLD = extract.extract_batch(model, processor, ims, cfg, sites)
    inputs = processor(text=[cfg.prompt] * 3, images=ims, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    mask = image_token_mask(inputs["input_ids"], model)
    for b in range(3):
        for layer in range(3):
            h_TD = hidden[layer][b]
            if pool == "image":
                want = h_TD[mask[b]].mean(0)
            elif pool == "all":
                want = h_TD[inputs["attention_mask"][b].bool()].mean(0)
            else:
                want = h_TD[-1]
            torch.testing.assert_close(got_BLD[b, layer], want, rtol=0, atol=1e-6)


def test_batched_equals_batch_one(tiny_models):
    model, processor = tiny_models("next-mistral")
    processor.tokenizer.padding_side = "left"
    ims = images([(64, 64), (48, 80), (100, 40), (37, 61)], seed=3)
    cfg = extract.Config(model="unused", prompt="<image>")
    sites = [f"model.language_model.layers.{i}" for i in (0, 2)]
    batched = extract.extract_batch(model, processor, ims, cfg, sites)
    single = torch.cat([extract.extract_batch(model, processor, [im], cfg, sites) for im in ims])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_cache_reuse_and_resume_after_kill(tiny_model_dir, small_world, tmp_path, monkeypatch):
    full = extract.main(_cfg(small_world, tmp_path / "a", model=str(tiny_model_dir)))
    ref = read_activation_cache(full)
    assert ref["acts"].shape == (24, 4, 64)  # 8 classes x 3 images, layers 0..3, d_model 64

    # Kill the run while it writes its third shard.
    import lineofsight.io

    real_save, calls = lineofsight.io.save_tensors, []

    def dying_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(lineofsight.io, "save_tensors", dying_save)
    cfg = _cfg(small_world, tmp_path / "b", model=str(tiny_model_dir))
    with pytest.raises(KeyboardInterrupt):
        extract.main(cfg)
    monkeypatch.setattr(lineofsight.io, "save_tensors", real_save)
    cache_b = next((tmp_path / "b").iterdir())
    assert sorted(p.name for p in cache_b.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (cache_b / "metadata.json").exists()
    done_mtimes = {p: p.stat().st_mtime_ns for p in cache_b.glob("shard-*")}

    assert extract.main(cfg) == cache_b  # resumes in the same folder
    assert all(p.stat().st_mtime_ns == t for p, t in done_mtimes.items())  # done shards not recomputed
    resumed = read_activation_cache(cache_b)
    assert torch.equal(resumed["acts"], ref["acts"]) and torch.equal(resumed["labels"], ref["labels"])
    assert resumed["paths"] == ref["paths"]

    # Same config again: the complete cache is reused as is.
    stamp = (cache_b / "metadata.json").stat().st_mtime_ns
    assert extract.main(cfg) == cache_b
    assert (cache_b / "metadata.json").stat().st_mtime_ns == stamp


def _bad_world(small_world, tmp_path):
    """A copy of the world's index and two classes, with one corrupt and one missing image."""
    import shutil

    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    shutil.copy(small_world / "imagenet" / "imagenet_class_index.json", root)
    index = json.loads((root / "imagenet_class_index.json").read_text())
    for key in ("0", "1"):
        shutil.copytree(small_world / "imagenet" / "train" / index[key][0], root / "train" / index[key][0])
    first = sorted((root / "train" / index["0"][0]).iterdir())
    first[0].write_bytes(b"not a png at all")
    first[1].unlink()
    first[1].symlink_to(root / "gone.png")  # listed, but the file is missing
    return root


def test_bad_images_are_skipped_and_counted(tiny_model_dir, small_world, tmp_path):
    root = _bad_world(small_world, tmp_path)
    cfg = extract.Config(model=str(tiny_model_dir), imagenet_dir=root, classes="2", images_per_class=4,
                         out=tmp_path / "acts", layers=(1,))
    cache = extract.main(cfg)
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["n_images"] == 6
    assert meta["skipped"]["counts"] == {"corrupt": 1, "missing": 1}
    assert "skipped 2" in meta["skipped_summary"]
    # Two workers decode and preprocess in parallel: the same activations, the same skips.
    par = extract.main(dataclasses.replace(cfg, num_workers=2, out=tmp_path / "acts-par"))
    par_meta = json.loads((par / "metadata.json").read_text())
    assert par_meta["skipped"] == meta["skipped"]
    a, b = read_activation_cache(cache), read_activation_cache(par)
    assert torch.equal(a["labels"], b["labels"]) and a["paths"] == b["paths"]
    torch.testing.assert_close(a["acts"], b["acts"], rtol=0, atol=0)


def test_every_image_bad_is_exit_2(tiny_model_dir, small_world, tmp_path):
    root = _bad_world(small_world, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "probes/compute_image_activations.py", "--model", str(tiny_model_dir),
         "--imagenet-dir", str(root), "--classes", "1", "--images-per-class", "2", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: every image was unreadable")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layers=(1, 9)), r"--layers 9 is out of range.*0\.\.3"),
        (dict(classes="CLASSES_FILE"), r"class 'squaer' is not in the class index.*did you mean square"),
        (dict(imagenet_dir=Path("/nonexistent")), "does not exist"),
        (dict(imagenet_dir="EMPTY"), "no imagenet_class_index.json"),
        (dict(prompt="no image here"), "must contain the image placeholder"),
    ],
)
def test_bad_input(tiny_model_dir, small_world, tmp_path, kw, message):
    if kw.get("classes") == "CLASSES_FILE":
        (tmp_path / "classes.txt").write_text("circle\nsquaer\n")
        kw["classes"] = str(tmp_path / "classes.txt")
    if kw.get("imagenet_dir") == "EMPTY":
        kw["imagenet_dir"] = tmp_path
    with pytest.raises(UserError, match=message):
        extract.main(_cfg(small_world, tmp_path / "o", model=str(tiny_model_dir), **kw))


def test_out_holding_other_config_is_refused(tiny_model_dir, small_world, tmp_path):
    cache = extract.main(_cfg(small_world, tmp_path / "o", model=str(tiny_model_dir), layers=(1,)))
    with pytest.raises(UserError, match="holds a cache of a different config.*layers"):
        extract.main(_cfg(small_world, cache, model=str(tiny_model_dir), layers=(2,)))


def test_probe_on_planted_features(tmp_path):
    """Layer 1 carries the class linearly, layer 0 is noise: the probe must tell them apart."""
    from lineofsight.io import save_tensors, write_json

    gen = torch.Generator().manual_seed(0)
    n_classes, per_class, d = 4, 30, 16
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    centres = torch.randn(n_classes, d, generator=gen) * 3
    acts = torch.randn(len(labels), 2, d, generator=gen)
    acts[:, 1] += centres[labels]
    save_tensors(tmp_path / "c" / "shard-00000.safetensors",
                 {"acts": acts, "labels": labels + 10, "item_index": torch.arange(len(labels))},
                 {"paths": json.dumps([f"x{i}.png" for i in range(len(labels))]), "skipped": "{}"})
    write_json(tmp_path / "c" / "metadata.json", {
        "n_images": len(labels), "layers": [0, 1], "d_model": d, "pool": "image", "shards": ["shard-00000.safetensors"],
        "class_names": ["a", "b", "c", "d"], "class_labels": [10, 11, 12, 13],
    })
    (tmp_path / "pairs.txt").write_text("a@b\n")
    metrics = probe.main(probe.Config(activations=tmp_path / "c", out=tmp_path / "p", pairs=tmp_path / "pairs.txt"))
    assert metrics["layers"]["1"]["top1"] == 1.0
    assert metrics["layers"]["0"]["top1"] < 0.6
    assert metrics["chance"] == 0.25 and metrics["best_layer"] == 1
    assert metrics["layers"]["1"]["n_test"] == 24 and metrics["layers"]["1"]["n_train"] == 96
    assert metrics["pairs"]["a@b"]["1"]["accuracy"] == 1.0
    # The pair direction separates b from a along the planted centres.
    from safetensors.torch import load_file

    direction = load_file(tmp_path / "p" / "pair_probes_layer1.safetensors")["a@b"]
    assert torch.dot(direction, centres[1] - centres[0]) > 0
    assert (tmp_path / "p" / "accuracy_by_layer.png").stat().st_size > 1000
    with pytest.raises(UserError, match="already holds a run of probes/train_probe.py"):
        probe.main(probe.Config(activations=tmp_path / "c", out=tmp_path / "p"))
    # An SAE that does not fit the cache is refused before any probe is trained or written.
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    for sae_cfg, message in ((SAEConfig(d_in=d, d_sae=2 * d, layer=3), "--sae reads layer 3"),
                             (SAEConfig(d_in=d + 1, d_sae=2 * d, layer=1), f"SAE width d_in {d + 1}")):
        SparseAutoencoder(sae_cfg).save(tmp_path / "sae")
        with pytest.raises(UserError, match=message):
            probe.main(probe.Config(activations=tmp_path / "c", out=tmp_path / "q", features="sae", sae=tmp_path / "sae"))
        assert not (tmp_path / "q").exists()


def test_sparse_probes_on_sae_latents(tmp_path):
    """--features sae: with an SAE whose latents are relu(x) and relu(-x) of the planted layer, the
    probe on all latents is perfect and sparse probes get better with more latents."""
    from lineofsight.io import save_tensors, write_json
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    gen = torch.Generator().manual_seed(1)
    n_classes, per_class, d = 4, 30, 16
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    centres = torch.randn(n_classes, d, generator=gen) * 3
    acts = torch.randn(len(labels), 1, d, generator=gen) + centres[labels][:, None]
    save_tensors(tmp_path / "c" / "shard-00000.safetensors",
                 {"acts": acts, "labels": labels, "item_index": torch.arange(len(labels))},
                 {"paths": json.dumps([f"x{i}.png" for i in range(len(labels))]), "skipped": "{}"})
    write_json(tmp_path / "c" / "metadata.json", {
        "n_images": len(labels), "layers": [3], "d_model": d, "pool": "image", "shards": ["shard-00000.safetensors"],
        "class_names": ["a", "b", "c", "d"], "class_labels": [0, 1, 2, 3],
    })
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, layer=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
    sae.save(tmp_path / "sae")
    (tmp_path / "pairs.txt").write_text("a@b\nc@d\n")
    with pytest.raises(UserError, match="--sparse hardconcrete needs --features sae and --pairs"):
        probe.Config(activations=tmp_path / "c", features="sae", sae=tmp_path / "sae", sparse="hardconcrete")
    metrics = probe.main(probe.Config(activations=tmp_path / "c", out=tmp_path / "p", features="sae",
                                      sae=tmp_path / "sae", sae_l0=(1, 32), pairs=tmp_path / "pairs.txt",
                                      sparse="hardconcrete", sparse_lambdas=(0.0, 10.0), sparse_steps=100,
                                      sparse_lr=0.1))
    result = metrics["sae_probe"]
    assert result["layer"] == 3 and result["dense_top1"] == 1.0
    assert result["by_l0"]["32"]["top1"] == 1.0 and result["by_l0"]["1"]["top1"] < 1.0
    assert len(result["by_l0"]["1"]["latents"]) == 1
    assert (tmp_path / "p" / "sae_probe_accuracy.png").is_file()
    gated = result["hardconcrete"]  # per pair: no penalty keeps gates open and separates; a huge one closes all
    assert gated["n_pairs"] == 2 and set(gated["by_lambda"]) == {"0.0", "10.0"}
    assert gated["by_lambda"]["0.0"]["accuracy"] == 1.0 and gated["by_lambda"]["0.0"]["l0"] > 1
    assert gated["by_lambda"]["10.0"]["l0"] == 0
    assert set(gated["by_lambda"]["10.0"]["per_pair"]) == {"a@b", "c@d"}
    wrong = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, layer=5))
    wrong.save(tmp_path / "sae5")
    with pytest.raises(UserError, match="reads layer 5"):
        probe.main(probe.Config(activations=tmp_path / "c", out=tmp_path / "q", features="sae", sae=tmp_path / "sae5"))


def test_hard_concrete_probe_finds_the_one_separating_latent():
    """Pair (0, 1) is separated by latent 5 alone and pair (2, 3) by latent 11 alone, every other latent is noise:
    at a moderate penalty each gated probe keeps exactly its latent and is perfect; without a penalty it keeps more;
    a huge penalty closes every gate."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(40)
    z = torch.relu(torch.randn(len(labels), 24, generator=gen))
    z[:, 5] = 0.2 * z[:, 5] + 3.0 * (labels == 1)
    z[:, 11] = 0.2 * z[:, 11] + 3.0 * (labels == 3)
    train, test = probe.split_indices(labels, 0.25, seed=0)
    fit = probe.hard_concrete_probes(z, labels, train, test, [(0, 1), (2, 3)], (0.0, 0.05, 10.0), steps=100,
                                     lr=0.1, seed=0)
    l0 = fit["l0"].view(3, 2)  # [lambda, pair]
    assert (l0[0] > 1).all() and (l0[2] == 0).all()
    assert l0[1].tolist() == [1, 1]
    assert fit["gates"][2].nonzero().flatten().tolist() == [5] and fit["gates"][3].nonzero().flatten().tolist() == [11]
    assert fit["accuracy"].view(3, 2)[1].tolist() == [1.0, 1.0]
    assert fit["accuracy"].view(3, 2)[2].tolist() == [0.5, 0.5]  # balanced pairs, no gate: the prior alone


def test_toy_model_class_is_linearly_decodable(tmp_path_factory):
    """The paper's first result on the embedded toy model: image class from the mean image-token residual."""
    from lineofsight.toy import generate_world

    world = generate_world(tmp_path_factory.mktemp("probe_world") / "w", seed=1, n_train_per_class=100,
                           n_val_per_class=1, n_captions=8)
    tmp = tmp_path_factory.mktemp("toy_probe")
    cache = extract.main(extract.Config(model="toy", imagenet_dir=world / "imagenet", images_per_class=100,
                                        batch_size=50, out=tmp / "acts"))
    metrics = probe.main(probe.Config(activations=cache, out=tmp / "probes"))
    top1 = {int(layer): m["top1"] for layer, m in metrics["layers"].items()}
    assert metrics["n_test"] == 160 and metrics["chance"] == 0.125
    assert max(top1.values()) * metrics["n_test"] >= 0.95 * metrics["n_test"] - 1e-3, top1  # the bar (152 of 160)
    assert min(top1.values()) >= 0.8, top1  # and far above chance (0.125) at every layer
