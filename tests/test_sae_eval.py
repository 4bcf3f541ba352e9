"""SAE evaluation metrics, modality scores and the HardConcrete approximation of steering vectors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_tiny, images, load_script

from lineofsight import sae_eval
from lineofsight.harvest import Harvester
from lineofsight.sae import SAEConfig, SparseAutoencoder
from lineofsight.steering import load_vectors

modality = load_script("sae/evaluation/modality.py")
approx = load_script("sae/approximate_steering_vectors.py")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def test_stats_match_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    latents = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    st = sae_eval.Stats(d_in=2, d_sae=4)
    st.add(x[:2], x_hat[:2], latents[:2])  # streamed in two pieces
    st.add(x[2:], x_hat[2:], latents[2:])
    r = st.result(dense_threshold=0.5)
    assert r["n_tokens"] == 3
    assert r["l0"] == pytest.approx(4 / 3)
    # residual 0 + 1 + 1 = 2; mean (2/3, 4/3): total = (1/9 + 16/9) + (4/9 + 4/9) + (1/9 + 4/9) = 30/9
    assert r["fvu"] == pytest.approx(2 / (30 / 9))
    cos = [1.0, 1.0, (2 + 4) / (math.sqrt(5) * math.sqrt(8))]
    assert r["cosine"] == pytest.approx(sum(cos) / 3)
    assert r["dead_frac"] == pytest.approx(0.5)  # latents 2 and 3 never fire
    assert r["dense_frac"] == pytest.approx(0.25)  # latent 0 fires on 3/3 > 0.5; latent 1 on 1/3
    assert sae_eval.ce_recovered(2.0, 2.0, 5.0) == 1.0 and sae_eval.ce_recovered(2.0, 5.0, 5.0) == 0.0
    assert sae_eval.ce_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)


def _identity_sae(d: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x exactly: W_enc = [I, -I], W_dec = [I; -I]."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.eval()


def test_ce_recovered_is_one_for_identity_and_zero_for_zero_sae():
    model, processor = build_tiny("next-mistral", n_layers=3, seed=4)
    harvester = Harvester(model, processor, [2], max_caption_tokens=32)
    captions = ["A red ball lies on green grass.", "Three birds sit on a wire against a grey sky."]
    batches = [([0, 1], captions, images([(32, 32), (64, 32)], seed=5))]
    ident = sae_eval.evaluate(model, _identity_sae(64), harvester, batches, 0.1)
    for splice in ("image", "text", "all"):
        assert ident["ce_recovered"][splice] == 1.0
        assert ident["ce"][f"zero/{splice}"] != ident["ce"]["clean"]
    assert ident["fvu"]["all"] == 0.0 and ident["fvu"]["image"] == 0.0
    assert ident["n_tokens"]["text_only"] > 0 and ident["n_tokens"]["image"] > 0

    zero = SparseAutoencoder(SAEConfig(d_in=64, d_sae=128))
    with torch.no_grad():
        zero.W_dec.zero_()
    res = sae_eval.evaluate(model, zero.eval(), harvester, batches, 0.1)
    for splice in ("image", "text", "all"):
        assert res["ce_recovered"][splice] == 0.0
    assert res["fvu"]["all"] >= 1.0  # x_hat = 0: sum ||x||^2 >= sum ||x - mean||^2


def _old_evaluate(model, sae, harvester, batches):
    """eval_sae's fork before it was chunked: all seven variants in one pass, logits for the caption tail
    (logits_to_keep), lineofsight.metrics.caption_nll; the reference the chunked path must equal (CE only)."""
    from lineofsight.harvest import TOKEN_TYPES
    from lineofsight.hooks import fork_batch
    from lineofsight.metrics import caption_nll
    from lineofsight.models import layer_names

    fork_at = layer_names(model)[harvester.layers[0]:]
    nll, n_caption = dict.fromkeys(sae_eval.RUNS, 0.0), 0
    image_code, text_code = TOKEN_TYPES.index("image"), TOKEN_TYPES.index("text_in_context")
    for _, captions, imgs in batches:
        inputs, keep, kind = harvester.prepare_with_image(captions, imgs)
        ids, caption = inputs["input_ids"], kind == text_code
        masks = {"image": kind == image_code, "text": caption, "all": (kind == image_code) | caption}

        def variants(x, keep=keep, masks=masks):
            recon = torch.zeros_like(x)
            recon[keep] = sae(x[keep])[0].to(x.dtype)
            out = [x]
            for splice in sae_eval.SPLICES:
                where = masks[splice][..., None]
                out += [torch.where(where, torch.zeros_like(x), x), torch.where(where, recon, x)]
            return out

        first = int(caption.int().argmax(1)[caption.any(1)].min())
        with torch.no_grad(), fork_batch(model, fork_at, variants):
            logits = model(**inputs, use_cache=False, logits_to_keep=ids.shape[1] - first + 1).logits
        for run, logits_BTV in zip(sae_eval.RUNS, logits.unflatten(0, (len(sae_eval.RUNS), ids.shape[0]))):
            value, count = caption_nll(logits_BTV, ids, caption)
            nll[run] += value
        n_caption += count
    return {k: v / n_caption for k, v in nll.items()}


def test_chunked_fork_equals_one_pass():
    """--fork-rows, the SAE's token chunks and the caption-logit chunks change no result: the same CE as
    the one-pass fork over full caption-tail logits, and the same sparsity/reconstruction metrics (up to the
    float32 rounding of the SAE's products on fewer rows)."""
    model, processor = build_tiny("next-mistral", n_layers=3, seed=4)
    harvester = Harvester(model, processor, [1], max_caption_tokens=32)
    captions = ["A red ball lies on green grass.", "Three birds sit on a wire against a grey sky.", "A cat."]
    batches = [([0, 1], captions[:2], images([(32, 32), (64, 32)], seed=5)), ([2], captions[2:], images([(32, 64)]))]
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=256, activation="topk", k=8), seed=3).eval()
    ref = _old_evaluate(model, sae, harvester, batches)
    results = [sae_eval.evaluate(model, sae, harvester, batches, 0.1, fork_rows=rows, nll_chunk_tokens=nll_chunk,
                                 sae_chunk_latents=sae_chunk)
               for rows, nll_chunk, sae_chunk in ((14, 4096, 2**26), (None, 3, 256 * 5), (3, 7, 256), (1, 1, 2**26))]
    for res in results:
        for run in sae_eval.RUNS:
            assert res["ce"][run] == pytest.approx(ref[run], rel=1e-6, abs=1e-6), run
        assert res["ce"]["sae/all"] != res["ce"]["clean"]
        assert res["n_caption_tokens"] == results[0]["n_caption_tokens"]
        for metric in ("l0", "fvu", "cosine", "dead_frac", "dense_frac", "n_tokens"):
            for g in sae_eval.GROUPS:
                assert res[metric][g] == pytest.approx(results[0][metric][g], rel=1e-6, abs=1e-9), (metric, g)


def test_modality_scores_image_only_text_only_and_shared():
    st = modality.LatentStats(d_sae=4, top_k=2)
    types = torch.tensor([0, 0, 1, 2, 2])
    latents = torch.tensor([
        [1.0, 0.0, 1.0, 0.0],  # image token
        [2.0, 0.0, 1.0, 0.0],  # image token
        [0.0, 1.0, 1.0, 0.0],  # caption token in context
        [0.0, 3.0, 1.0, 0.0],  # caption alone
        [0.0, 0.0, 0.0, 0.0],
    ])
    st.add(latents, types, torch.arange(5))
    scores = st.scores()
    assert scores["mass"][0] == 1.0 and scores["mass"][1] == 0.0 and scores["mass"][2] == 0.5
    assert math.isnan(float(scores["mass"][3]))  # never fires: left out
    # frequency: latent 2 fires on 2/2 image and 2/3 text tokens -> 1 / (1 + 2/3)
    assert float(scores["frequency"][2]) == pytest.approx(1 / (1 + 2 / 3))
    shares = modality.categorise(scores["mass"], 0.9, 0.1)
    assert shares["n_live"] == 3
    assert shares["image_only"] == pytest.approx(1 / 3) and shares["text_only"] == pytest.approx(1 / 3)
    assert st.top_val[0, 0].tolist() == [2.0, 1.0] and st.top_tok[0, 0].tolist() == [1, 0]
    assert st.top_val[1, 1].tolist() == [3.0, 1.0] and st.top_tok[1, 1].tolist() == [3, 2]


def test_categorise_counts_each_latent_once_with_the_thresholds_inclusive():
    nan = float("nan")
    #                      text-only       shared                   image-only   never fired
    scores = torch.tensor([0.0, 0.05, 0.1, 0.1000001, 0.5, 0.8999999, 0.9, 1.0, nan, nan], dtype=torch.float64)
    got = modality.categorise(scores, image_only=0.9, text_only=0.1)
    assert got["counts"] == {"image_only": 2, "shared": 3, "text_only": 3} and got["n_live"] == 8
    assert got["image_only"] == 2 / 8 and got["shared"] == 3 / 8 and got["text_only"] == 3 / 8
    masks = modality.category_masks(scores, 0.9, 0.1)
    assert masks["shared"].tolist() == [False] * 3 + [True] * 3 + [False] * 4
    assert not any(m[8:].any() for m in masks.values())  # NaN: in no category
    # other thresholds move the boundary latents, and only those
    assert modality.categorise(scores, image_only=0.5, text_only=0.0)["counts"] == {
        "image_only": 4, "shared": 3, "text_only": 1}
    assert modality.categorise(torch.full((3,), nan, dtype=torch.float64), 0.9, 0.1) == {
        "image_only": 0.0, "shared": 0.0, "text_only": 0.0, "n_live": 0,
        "counts": {"image_only": 0, "shared": 0, "text_only": 0}}


def test_hard_concrete_recovers_a_five_atom_vector_and_beats_random():
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(512, 64, generator=g), dim=-1)
    atoms = [3, 50, 120, 300, 451]
    target = (torch.tensor([1.0, 0.8, 0.6, 1.2, 0.5])[:, None] * D[atoms]).sum(0, keepdim=True)
    rand = approx.random_unit(8, 64, seed=1)
    lam = torch.full((9,), 1e-2)
    fit = approx.hard_concrete_fit(torch.cat([target, rand]), D, lam, steps=1000, lr=1e-2, seed=0)
    assert float(fit["cosine"][0]) >= 0.99 and int(fit["l0"][0]) <= 10
    assert set(atoms) <= set(fit["gates"][0].nonzero().flatten().tolist())
    # random directions get less cosine for at least as many latents
    assert float(fit["cosine"][1:].mean()) < float(fit["cosine"][0]) - 0.1
    assert float(fit["l0"][1:].float().mean()) >= int(fit["l0"][0])


@pytest.fixture(scope="module")
def toy_sae(tmp_path_factory):
    """A small SAE trained on the toy model's layer 2 over the first 64 captions of a small world."""
    from lineofsight.toy import generate_world

    world = generate_world(tmp_path_factory.mktemp("w") / "world", seed=0, n_train_per_class=1, n_val_per_class=1,
                           n_captions=80)
    out = tmp_path_factory.mktemp("sae") / "run"
    (world / "train.json").write_text(json.dumps(json.loads((world / "sharegpt4v.json").read_text())[:64]))
    proc = _run(["sae/sae-trainer.py", "--data", str(world / "train.json"), "--layer", "2", "--expansion", "4",
                 "--lr", "1e-3", "--batch-size", "256", "--total-tokens", "40000", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return world, out


def test_toy_sae_recovers_most_of_the_loss(toy_sae, tmp_path):
    world, run = toy_sae
    proc = _run(["sae/evaluation/eval_sae.py", "--sae", str(run), "--data", str(world / "sharegpt4v.json"),
                 "--offset", "64", "--limit", "16", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["ce_recovered"]["all"] >= 0.8
    assert set(res["l0"]) == {"all", "image", "text_in_context", "text_only"}
    assert "CE loss recovered" in proc.stdout


def test_modality_and_approximation_scripts_run(toy_sae, tmp_path):
    world, run = toy_sae
    proc = _run(["sae/evaluation/modality.py", "--saes", str(run), "--data", str(world / "sharegpt4v.json"),
                 "--offset", "64", "--limit", "8", "--out", str(tmp_path / "mod")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "mod" / "modality.json").read_text())
    layer2 = res["layers"]["2"]
    assert layer2["mass"]["n_live"] > 0 and sum(layer2["histogram"]) == layer2["mass"]["n_live"]
    assert res["examples"] and all((tmp_path / "mod" / e["plot"]).is_file() for e in res["examples"].values())
    assert (tmp_path / "mod" / "modality_by_layer.png").is_file()
    assert json.loads((tmp_path / "mod" / "run.json").read_text())["status"] == "done"

    vec = tmp_path / "vectors"
    vec.mkdir()
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"circle@square/2": torch.randn(128, generator=g), "star@ring/2": torch.randn(128, generator=g)},
              vec / "vectors.safetensors")
    (vec / "vectors.json").write_text(json.dumps({"layers": [2], "pairs": ["circle@square", "star@ring"]}))
    args = ["sae/approximate_steering_vectors.py", "--vectors", str(vec), "--sae", str(run), "--steps", "50",
            "--lambdas", "0.001", "0.01", "--export-lambda", "0.01", "0.001", "--out", str(tmp_path / "ap")]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "ap" / "approximation.json").read_text())
    assert set(res["steering"]["by_lambda"]) == {"0.001", "0.01"} and res["bases"] == ["sae"]
    original, _ = load_vectors(vec, 2)
    for lam in ("0.01", "0.001"):
        exported, info = load_vectors(tmp_path / "ap" / "vectors" / f"lambda{lam}", 2)
        assert sorted(exported) == ["circle@square", "star@ring"] and info["pairs"] == ["circle@square", "star@ring"]
        assert info["basis"] == "sae" and info["lambda"] == float(lam)
        assert info["mean_l0"] == res["steering"]["by_lambda"][lam]["l0"]
        for name, v in exported.items():
            assert float(v.norm()) == pytest.approx(float(original[name].norm()), rel=1e-5)
    again = _run(args)  # an earlier run in --out is replaced only with --overwrite
    assert again.returncode == 2 and "already holds a run" in again.stderr.strip().splitlines()[-1]
    assert _run([*args, "--overwrite"]).returncode == 0

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"circle@square/2": torch.randn(64)}, bad / "vectors.safetensors")
    (bad / "vectors.json").write_text(json.dumps({"layers": [2], "pairs": ["circle@square"]}))
    proc = _run(["sae/approximate_steering_vectors.py", "--vectors", str(bad), "--sae", str(run), "--out",
                 str(tmp_path / "x")])
    assert proc.returncode == 2 and "width 64" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["layer", "width", "empty"])
def test_eval_bad_input_is_one_line_exit_2(toy_sae, tmp_path, kind):
    world, run = toy_sae
    sae_dir = run / "saes" / "L2"
    args = ["--data", str(world / "sharegpt4v.json"), "--limit", "2"]
    if kind in ("layer", "width"):
        sae = SparseAutoencoder.load(sae_dir)
        if kind == "layer":
            sae.cfg.layer = 99
            expected = "out of range"
        else:
            sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=128, model=sae.cfg.model, layer=2))
            expected = "does not match the model's d_model 128"
        sae_dir = tmp_path / "sae"
        sae.save(sae_dir)
    else:
        args = ["--data", str(world / "sharegpt4v.json"), "--offset", "100000"]
        expected = "no records after --offset"
    proc = _run(["sae/evaluation/eval_sae.py", "--sae", str(sae_dir), *args, "--out", str(tmp_path / "o")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]


def test_eval_resize_mismatch_is_one_line_exit_2(toy_sae, tmp_path):
    """An SAE trained at another resize: refused before the model loads (a model that does not exist is never
    reached), one line, exit 2; --allow-resize-mismatch runs anyway."""
    world, run = toy_sae
    sae = SparseAutoencoder.load(run / "saes" / "L2")
    sae.cfg.resize = 48
    sae.save(tmp_path / "sae")
    args = ["sae/evaluation/eval_sae.py", "--sae", str(tmp_path / "sae"), "--data", str(world / "sharegpt4v.json"),
            "--offset", "64", "--limit", "2"]
    proc = _run([*args, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resize none reads full-size images, but the SAE ") and "48 x 48 px" in last \
        and "--allow-resize-mismatch" in last, proc.stderr[-2000:]
    proc = _run([*args, "--allow-resize-mismatch", "--out", str(tmp_path / "o")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["n_records"] == 2


@pytest.mark.parametrize("kind", ["next-mistral", "next-llama", "next-qwen2"])
def test_mlp_output_directions_are_the_down_projection_columns(tiny_models, kind):
    from lineofsight.models import mlp_output_directions

    model, _ = tiny_models(kind)
    for block in (0, 2):
        down = model.model.language_model.layers[block].mlp.down_proj.weight  # [d_model, d_mlp]
        directions = mlp_output_directions(model, block)
        assert directions.shape == (128, 64)
        assert torch.equal(directions, torch.nn.functional.normalize(down.detach().T, dim=-1))


def test_neuron_basis_finds_one_scaled_neuron(tiny_model_dir, tmp_path, capsys):
    """--basis neurons at layer 2 reads block 1's MLP: a vector that is 2.5 times one of its neuron directions
    is found with one open gate and cosine 1; its export keeps the norm. Layer 0 has no block before it."""
    from lineofsight import cli
    from lineofsight.models import load_vlm, mlp_output_directions
    from lineofsight.steering import save_vectors

    model, _ = load_vlm(str(tiny_model_dir))
    neuron = model.model.language_model.layers[1].mlp.down_proj.weight[:, 7].detach()
    assert not torch.allclose(mlp_output_directions(model, 0)[7], neuron / neuron.norm())  # blocks differ
    target = 2.5 * neuron / neuron.norm()
    save_vectors(tmp_path / "vec", {("circle", "square", 2): target}, {"method": "diff"})
    res = approx.main(approx.Config(vectors=tmp_path / "vec", basis=("neurons",), layer=2, model=str(tiny_model_dir),
                                    lambdas=(3e-2,), steps=100, lr=5e-2, export_lambda=(3e-2,), out=tmp_path / "ap",
                                    device="cpu"))
    assert res["bases"] == ["neurons"] and "steering" not in res
    assert (res["neurons"]["block"], res["neurons"]["d_mlp"]) == (1, 128)
    [row] = res["neurons"]["steering"]["per_vector"]
    assert row["l0"] == 1 and row["cosine"] > 0.9999
    exported, info = load_vectors(tmp_path / "ap" / "vectors" / "lambda0.03", 2)
    assert info["basis"] == "neurons" and info["mean_l0"] == 1
    assert torch.allclose(exported["circle@square"], target, atol=1e-4)
    assert (tmp_path / "ap" / "approximation.png").is_file()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run(approx.main, approx.Config, ["--vectors", str(tmp_path / "vec"), "--basis", "sae", "neurons",
                                             "--layer", "0", "--model", str(tiny_model_dir), "--out",
                                             str(tmp_path / "l0")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "no decoder block writes into layer 0" in err[0]
    assert not (tmp_path / "l0").exists()
