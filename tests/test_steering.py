"""lineofsight.steering: exact edits at the chosen positions, prefill only, cache-independent."""

from __future__ import annotations

import pytest
import torch
from conftest import images

from lineofsight.hooks import Trace
from lineofsight.models import format_prompt, image_token_mask, residual_site
from lineofsight.steering import steer


def _batch(processor):
    processor.tokenizer.padding_side = "left"
    prompts = [format_prompt(processor, "What is shown in this image?"), format_prompt(processor, "Describe it.")]
    return processor(text=prompts, images=images([(64, 64), (48, 80)]), return_tensors="pt", padding=True)


def test_zero_vector_is_identity(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _batch(processor)
    with torch.no_grad():
        clean = model(**inputs).logits
        with steer(model, 1, torch.zeros(64), inputs["input_ids"], inputs["attention_mask"]):
            steered = model(**inputs).logits
    assert torch.equal(clean, steered)


@pytest.mark.parametrize("positions", ["image", "prompt", "all"])
def test_edit_lands_exactly_on_positions(tiny_models, positions):
    model, processor = tiny_models("next-mistral")
    inputs = _batch(processor)
    layer = 2
    delta_BD = torch.randn(2, 64)
    with torch.no_grad():
        clean = model(**inputs, output_hidden_states=True).hidden_states[layer]
        # Read the edited residual with a second trace registered after the steering hook.
        with steer(model, layer, delta_BD, inputs["input_ids"], inputs["attention_mask"], positions), \
                Trace(model, residual_site(model, layer), retain_input=True, retain_output=False) as tr:
            model(**inputs)
    if positions == "image":
        mask = image_token_mask(inputs["input_ids"], model)
    else:
        mask = inputs["attention_mask"].bool()
    assert torch.equal(tr.input, clean + mask[..., None] * delta_BD[:, None, :])
    assert (~mask).any() and mask.any()


@pytest.mark.parametrize("positions", ["image", "all"])
def test_cached_and_uncached_generation_agree(tiny_models, positions):
    model, processor = tiny_models("next-llama")
    inputs = _batch(processor)
    delta = torch.randn(64) * 5
    pad = processor.tokenizer.pad_token_id
    outs = []
    for use_cache in (True, False):
        with torch.no_grad(), steer(model, 1, delta, inputs["input_ids"], inputs["attention_mask"], positions):
            outs.append(model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                       pad_token_id=pad, eos_token_id=None))
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=None)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], plain)  # the edit changed what the model says


# ---------------------------------------------------------------------------------------------
# The scripts: compute_steering_vectors.py, steering_rollouts.py, eval_steering.py
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import ROOT, load_script  # noqa: E402

from lineofsight.cache import read_activation_cache  # noqa: E402
from lineofsight.cli import UserError  # noqa: E402

extract = load_script("probes/compute_image_activations.py")
vectors_script = load_script("steering/compute_steering_vectors.py")
rollouts_script = load_script("steering/steering_rollouts.py")
eval_script = load_script("steering/eval_steering.py")


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, small_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steer")
    cache = extract.main(extract.Config(model=str(tiny_model_dir), imagenet_dir=small_world / "imagenet",
                                        images_per_class=3, out=tmp / "acts"))
    (tmp / "pairs.txt").write_text("circle@square\nstar@triangle\n")
    vectors_script.main(vectors_script.Config(activations=cache, pairs=tmp / "pairs.txt", out=tmp / "vec"))
    return {"tmp": tmp, "cache": cache, "model": str(tiny_model_dir), "world": small_world}


def test_vectors_are_differences_of_class_means(tiny_setup):
    from safetensors.torch import load_file

    cache = read_activation_cache(tiny_setup["cache"])
    names = cache["meta"]["class_names"]
    vecs = load_file(tiny_setup["tmp"] / "vec" / "vectors.safetensors")
    info = json.loads((tiny_setup["tmp"] / "vec" / "vectors.json").read_text())
    assert len(vecs) == 2 * len(cache["meta"]["layers"]) == len(info["vectors"])
    for li, layer in enumerate(cache["meta"]["layers"]):
        acts = cache["acts"][:, li]
        mean = {n: acts[cache["labels"] == cache["meta"]["class_labels"][names.index(n)]].mean(0) for n in names}
        torch.testing.assert_close(vecs[f"circle@square/{layer}"], mean["square"] - mean["circle"], rtol=0, atol=1e-6)
    entry = info["vectors"][0]
    assert entry["n_src"] == entry["n_tgt"] == 3


def test_vectors_bad_class_is_named(tiny_setup):
    (tiny_setup["tmp"] / "bad.txt").write_text("circle@sqare\n")
    with pytest.raises(UserError, match="class 'sqare'.*did you mean square"):
        vectors_script.main(vectors_script.Config(activations=tiny_setup["cache"], pairs=tiny_setup["tmp"] / "bad.txt",
                                                  out=tiny_setup["tmp"] / "bad"))


def _rollout_cfg(setup, out, **kw):
    base = dict(vectors=setup["tmp"] / "vec", layer=1, model=setup["model"], imagenet_dir=setup["world"] / "imagenet",
                split="train", k=(0.0, 50.0), images_per_pair=2, max_new_tokens=4, batch_size=5, out=out)
    return rollouts_script.Config(**{**base, **kw})


def test_rollouts_batching_resume_and_k0(tiny_setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is shown in this image?\nDescribe it.\n")
    path = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "a", prompts=prompts))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * 2  # pairs x images x prompts x k
    for key in ("src", "tgt", "layer", "k", "prompt", "image", "text", "n_tokens"):
        assert key in records[0]
    # Batch size changes nothing; k = 0 matches plain generation.
    one = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "b", prompts=prompts, batch_size=1))
    assert [json.loads(line)["text"] for line in one.read_text().splitlines()] == [r["text"] for r in records]
    # The folder holds a run: refused without --resume / --overwrite, and left as it was.
    lines = path.read_text().splitlines()
    with pytest.raises(UserError, match="already holds a run of steering/steering_rollouts.py.*--resume"):
        rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "a", prompts=prompts))
    assert path.read_text().splitlines() == lines
    # Resume: drop the last records (and leave a torn line), re-run, get the same file.
    path.write_text("\n".join(lines[:9]) + '\n{"src": "cir')
    again = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "a", prompts=prompts, resume=True))
    assert again.read_text().splitlines() == lines
    # Another config appended with --resume (layer 2, other k) keeps every layer-1 rollout.
    more = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "a", prompts=prompts, resume=True, layer=2,
                                             k=(25.0,)))
    merged = more.read_text().splitlines()
    assert merged[: len(lines)] == lines and len(merged) == len(lines) + 2 * 2 * 2
    assert {json.loads(line)["layer"] for line in merged[len(lines):]} == {2}
    # --overwrite starts again: only this config's rollouts remain.
    fresh = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "a", prompts=prompts, overwrite=True))
    assert fresh.read_text().splitlines() == lines


def test_rollouts_under_torchrun_match_single_process(tiny_setup, tmp_path):
    single = rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "single", n_pairs=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "steering/steering_rollouts.py", "--vectors", str(tiny_setup["tmp"] / "vec"), "--layer", "1",
         "--model", tiny_setup["model"], "--imagenet-dir", str(tiny_setup["world"] / "imagenet"), "--split", "train",
         "--k", "0", "50", "--images-per-pair", "2", "--max-new-tokens", "4", "--batch-size", "5", "--n-pairs", "1",
         "--device", "cpu", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ddp" / "rollouts.jsonl").read_text() == single.read_text()
    assert not list((tmp_path / "ddp").glob("rollouts.rank*"))
    # The default questions are the paper's ten, with the pair's class names filled in.
    records = [json.loads(line) for line in single.read_text().splitlines()]
    assert sorted({r["prompt_id"] for r in records}) == list(range(10))
    r = next(r for r in records if r["prompt_id"] == 9)
    assert r["prompt"] == f'Is this image more related to the concept "{r["src"]}" or the concept "{r["tgt"]}"?'
    assert next(r for r in records if r["prompt_id"] == 0)["prompt"] == "What is shown in this image?"


def _reference_damage(setup, layer, k, n_captions):
    """Damage by hand: one caption at a time (no padding, no shared encoding), the vector added by a
    plain forward pre-hook at the image tokens, the caption's NLL from log_softmax."""
    from safetensors.torch import load_file

    from lineofsight.data import load_image, read_sharegpt4v
    from lineofsight.models import load_vlm
    from lineofsight.prompts import CAPTION_QUESTION

    model, processor = load_vlm(setup["model"])
    vecs = load_file(setup["tmp"] / "vec" / "vectors.safetensors")
    block = model.get_submodule(residual_site(model, layer))
    prompt = format_prompt(processor, CAPTION_QUESTION)
    records = read_sharegpt4v(setup["world"] / "sharegpt4v.json")[:n_captions]

    def nll(v):
        total, count = 0.0, 0
        for rec in records:
            text = prompt + " " + rec.caption
            inputs = processor(text=[text], images=[load_image(setup["world"] / rec.image)], return_tensors="pt")
            ids = inputs["input_ids"][0]
            n = len(processor.tokenizer(text)["input_ids"]) - len(processor.tokenizer(prompt)["input_ids"])
            mask = image_token_mask(inputs["input_ids"], model)[0]

            def add(_module, args, kwargs, v=v, mask=mask):
                hidden = args[0] if args else kwargs["hidden_states"]
                edited = hidden + k * mask[None, :, None] * v
                return ((edited, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": edited})

            handle = block.register_forward_pre_hook(add, with_kwargs=True)
            try:
                with torch.no_grad():
                    logp = model(**inputs).logits[0].float().log_softmax(-1)
            finally:
                handle.remove()
            for pos in range(len(ids) - n, len(ids)):
                total -= float(logp[pos - 1, ids[pos]])
            count += n
        return total / count

    base = nll(torch.zeros_like(vecs[f"circle@square/{layer}"]))
    steered = [nll(vecs[f"{pair}/{layer}"]) - base for pair in ("circle@square", "star@triangle")]
    return base, sum(steered) / len(steered)


def test_eval_steering_metrics(tiny_setup, tmp_path):
    result = eval_script.main(eval_script.Config(
        vectors=tiny_setup["tmp"] / "vec", layer=(1, 2), model=tiny_setup["model"],
        imagenet_dir=tiny_setup["world"] / "imagenet", split="train", data=tiny_setup["world"] / "sharegpt4v.json",
        k=(0.0, 20.0), images_per_pair=2, n_captions=3, out=tmp_path / "e"))
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"1", "2"} and set(metrics["1"]) == {"0.0", "20.0"}
    for layer in ("1", "2"):
        assert set(metrics[layer]["20.0"]) >= {"p_tgt", "p_src", "flip_rate", "damage_nll"}
    # Damage and the unsteered NLL equal a caption-by-caption computation by hand.
    base, damage = _reference_damage(tiny_setup, 2, 20.0, 3)
    assert metrics["2"]["0.0"]["caption_nll_unsteered"] == pytest.approx(base, rel=1e-4)
    assert metrics["2"]["20.0"]["damage_nll"] == pytest.approx(damage, rel=1e-3, abs=1e-5)
    assert abs(damage) > 1e-3  # the reference itself moved: the check is not 0 == 0
    assert result["n_captions"] == 3 and result["answer_scoring"] == "sequence"  # the default, recorded
    for plot in ("efficacy.png", "damage.png"):
        assert (tmp_path / "e" / plot).stat().st_size > 1000
    run_record = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run_record["script"] == "steering/eval_steering.py" and run_record["status"] == "done"


def test_rollouts_bad_layer(tiny_setup, tmp_path):
    with pytest.raises(UserError, match=r"--layer 7: the vectors .* are for layers \[0, 1, 2, 3\]"):
        rollouts_script.main(_rollout_cfg(tiny_setup, tmp_path / "x", layer=7))


def test_steering_flips_the_toy_models_answer(tmp_path_factory):
    """The paper's causal result on the embedded toy: adding v(src@tgt) at the image tokens of one
    layer makes the forced choice name tgt instead of src. The layer and k are searched in a small
    grid, not given: some (layer, k) must flip >= 80 % of held-out src images, k = 0 at most 5 %. (The toy
    retrained with the lettered task reads the class off the image tokens within block 0: it flips every image
    at layer 0 from k = 4, one pair in three at layers 1-2.)"""
    from lineofsight.toy import generate_world

    world = generate_world(tmp_path_factory.mktemp("flip_world") / "w", seed=2, n_train_per_class=12,
                           n_val_per_class=5, n_captions=4)
    tmp = tmp_path_factory.mktemp("flip")
    layers = (0, 1, 2)
    cache = extract.main(extract.Config(model="toy", imagenet_dir=world / "imagenet", images_per_class=12,
                                        layers=layers, out=tmp / "acts"))
    (tmp / "pairs.txt").write_text("circle@star\nsquare@triangle\nheart@ring\n")
    vectors_script.main(vectors_script.Config(activations=cache, pairs=tmp / "pairs.txt", out=tmp / "vec"))
    result = eval_script.main(eval_script.Config(
        vectors=tmp / "vec", layer=layers, model="toy", imagenet_dir=world / "imagenet", split="val",
        data=world / "sharegpt4v.json", k=(0.0, 4.0, 8.0), images_per_pair=5, n_captions=4, out=tmp / "eval"))
    metrics = result["metrics"]
    for layer in layers:
        k0 = metrics[str(layer)]["0.0"]
        assert k0["flip_rate"] <= 0.05 and k0["p_src"] > k0["p_tgt"], metrics
    best = max(((layer, k) for layer in map(str, layers) for k in ("4.0", "8.0")),
               key=lambda lk: metrics[lk[0]][lk[1]]["flip_rate"])
    m = metrics[best[0]][best[1]]
    assert m["flip_rate"] >= 0.8 and m["p_tgt"] > m["p_src"], (best, metrics)


@pytest.mark.parametrize("positions", ["image", "all"])
def test_greedy_decode_equals_generate(tiny_models, positions):
    """The rollouts' lean KV-cached loop gives generate's tokens: left padding, mixed sizes, EOS."""
    model, processor = tiny_models("next-mistral")
    inputs = _batch(processor)
    tok = processor.tokenizer
    delta = torch.randn(2, 64) * 5
    with torch.no_grad(), steer(model, 1, delta, inputs["input_ids"], inputs["attention_mask"], positions):
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)[:, inputs["input_ids"].shape[1]:]
        ours = rollouts_script.greedy_decode(model, inputs, 8, eos_id=-1, pad_id=tok.pad_token_id)
    assert torch.equal(ours, ref)
    # With the second token of row 0 as "EOS", row 0 ends there and is padded afterwards.
    eos = int(ref[0, 1])
    with torch.no_grad(), steer(model, 1, delta, inputs["input_ids"], inputs["attention_mask"], positions):
        cut = rollouts_script.greedy_decode(model, inputs, 8, eos_id=eos, pad_id=tok.pad_token_id)
    first = int((ref[0] == eos).nonzero()[0])
    assert cut[0, : first + 1].tolist() == ref[0, : first + 1].tolist()
    assert (cut[0, first + 1 :] == tok.pad_token_id).all()


def test_mean_residual_norm_for_normalize_is_the_image_token_mean(tiny_models):
    """--normalize's scale: the mean norm of hidden_states[layer] over exactly the image tokens."""
    model, processor = tiny_models("next-mistral")
    processor.tokenizer.padding_side = "left"
    ims = images([(64, 64), (48, 80), (64, 64)])
    prompt = format_prompt(processor, "What is shown in this image?")
    got = rollouts_script.mean_residual_norm(model, processor, ims, prompt, 2)
    inputs = processor(text=[prompt] * 3, images=ims, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
    want = hidden[image_token_mask(inputs["input_ids"], model)].norm(dim=-1).mean()
    assert got == pytest.approx(float(want), rel=1e-5)


def test_appending_after_a_torn_line_loses_no_rollout(tmp_path):
    """A kill mid-write leaves a part file without its last newline: the next append cuts the torn
    record off first, so the new records are whole lines and the merge counts what is on disk."""
    from lineofsight.steering import append_rollouts, merge_rollouts, read_rollouts

    def rec(k):
        return {"src": "a", "tgt": "b", "layer": 1, "k": float(k), "prompt_id": 0, "image": "x.png",
                "positions": "image", "text": f"t{k}", "n_tokens": 1}

    part = tmp_path / "rollouts.rank0.jsonl"
    part.write_text(json.dumps(rec(0)) + "\n" + json.dumps(rec(1))[:25])
    with append_rollouts(part) as write:
        write([rec(1), rec(2)])
    assert [r["k"] for r in read_rollouts(part)] == [0.0, 1.0, 2.0]
    assert merge_rollouts(tmp_path, [rec(k) for k in range(3)]) == 3
    assert [r["k"] for r in read_rollouts(tmp_path / "rollouts.jsonl")] == [0.0, 1.0, 2.0]
    assert not part.exists()


# eval_steering in bounded memory: logits only where they are used, equal to the full-logits computation.


def _old_caption_nll(model, processor, layer, captions, v, strengths, positions, batch_size):
    """eval_steering's caption NLL before logits were bounded: full-sequence logits, then
    lineofsight.metrics.caption_nll (the reference the chunked path must equal)."""
    from lineofsight.metrics import caption_nll, caption_tail_mask
    from lineofsight.models import vlm_inputs

    totals, count = dict.fromkeys(strengths, 0.0), 0
    for lo in range(0, len(captions), batch_size):
        batch = captions[lo : lo + batch_size]
        inputs = vlm_inputs(model, processor, [c["image"] for c in batch], [c["text"] for c in batch])
        ids = inputs["input_ids"]
        caption = caption_tail_mask(ids, [c["n_caption_tokens"] for c in batch])
        for k in strengths:
            with torch.no_grad(), steer(model, layer, (k * v).expand(len(batch), -1), ids, inputs["attention_mask"],
                                        positions):
                logits = model(**inputs, use_cache=False).logits
            totals[k] += caption_nll(logits, ids, caption)[0]
        count += int(caption.sum())
    return {k: total / count for k, total in totals.items()}


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1024])
def test_eval_steering_logits_only_where_used_equal_full_logits(tiny_models, chunk_tokens):
    model, processor = tiny_models("next-mistral")
    processor.tokenizer.padding_side = "left"
    tok = processor.tokenizer
    prompt = format_prompt(processor, "What is shown in this image?")
    n_prompt = len(tok(prompt)["input_ids"])
    texts = ["A red ball lies on green grass.", "Three birds.", "A small grey cat sleeps on a blue sofa by a window."]
    captions = []
    for image, text in zip(images([(64, 64), (48, 80), (32, 32)], seed=3), texts):
        full = prompt + " " + text
        captions.append({"image": image, "text": full, "n_caption_tokens": len(tok(full)["input_ids"]) - n_prompt})
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    strengths = [0.0, 4.0]
    for batch_size in (2, 3):  # padding inside a batch, and a ragged last batch
        new = eval_script.steered_caption_nll(model, processor, 2, captions, v, strengths, "image", batch_size,
                                              chunk_tokens=chunk_tokens)
        old = _old_caption_nll(model, processor, 2, captions, v, strengths, "image", batch_size)
        for k in strengths:
            assert new[k] == pytest.approx(old[k], rel=1e-6, abs=1e-6)
        assert new[4.0] != new[0.0]

    # The forced choice: logits of the last position alone equal the last row of full logits.
    cases = [{"image": c["image"], "prompt": format_prompt(processor, q), "v": v, "tgt_ids": [5], "src_ids": [9]}
             for c, q in zip(captions, ["Is it red?", "Reply either a or b.", "Which one?"])]
    got = eval_script.efficacy(model, processor, 2, cases, strengths, "image", 4)
    from lineofsight.models import vlm_inputs

    for k in strengths:
        inputs = vlm_inputs(model, processor, [c["image"] for c in cases], [c["prompt"] for c in cases])
        with torch.no_grad(), steer(model, 2, k * v[None].expand(3, -1), inputs["input_ids"],
                                    inputs["attention_mask"], "image"):
            probs = model(**inputs, use_cache=False).logits[:, -1].float().softmax(-1)
        assert got[k]["p_tgt"] == pytest.approx(float(probs[:, 5].mean()), rel=1e-6, abs=1e-7)
        assert got[k]["p_src"] == pytest.approx(float(probs[:, 9].mean()), rel=1e-6, abs=1e-7)
        assert got[k]["flip_rate"] == float((probs[:, 5] > probs[:, 9]).float().mean())


def test_eval_steering_resize_mismatch_is_one_line_exit_2(tiny_setup, tmp_path):
    """Vectors recorded at another resize: refused before the model loads (a model that does not exist is
    never reached), one line, exit 2; --allow-resize-mismatch runs anyway, and a matching --resize runs."""
    import shutil

    vec = tmp_path / "vec"
    shutil.copytree(tiny_setup["tmp"] / "vec", vec)
    info = json.loads((vec / "vectors.json").read_text())
    (vec / "vectors.json").write_text(json.dumps({**info, "resize": 48}))
    world = tiny_setup["world"]
    args = ["steering/eval_steering.py", "--vectors", str(vec), "--layer", "1", "--imagenet-dir",
            str(world / "imagenet"), "--split", "train", "--data", str(world / "sharegpt4v.json"), "--k", "0", "5",
            "--images-per-pair", "1", "--n-captions", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args, "--model", str(tmp_path / "no-such-model"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resize none reads full-size images, but the steering vectors in") and \
        "48 x 48 px" in last and "--allow-resize-mismatch" in last, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()
    base = dict(vectors=vec, layer=(1,), model=tiny_setup["model"], imagenet_dir=world / "imagenet", split="train",
                data=world / "sharegpt4v.json", k=(0.0, 5.0), images_per_pair=1, n_captions=1)
    for kw in ({"allow_resize_mismatch": True}, {"resize": 48}):
        result = eval_script.main(eval_script.Config(**base, **kw, out=tmp_path / str(len(kw) + len(str(kw)))))
        assert result["n_captions"] == 1 and set(result["metrics"]["1"]) == {"0.0", "5.0"}
    with pytest.raises(UserError, match="--resize 0"):
        eval_script.Config(**base, resize=0)


def test_caption_tail_mask_marks_the_last_n_positions_of_each_row():
    from lineofsight.metrics import caption_tail_mask

    mask = caption_tail_mask(torch.zeros(3, 5, dtype=torch.long), [2, 0, 5])
    assert mask.tolist() == [[False, False, False, True, True], [False] * 5, [True] * 5]
