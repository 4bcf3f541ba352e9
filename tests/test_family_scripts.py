"""Every script end to end on each family beyond LLaVA (LLaVA-OneVision, Qwen2.5-VL, Gemma 3, Idefics3): one chain
per family on a tiny random model saved with save_pretrained (``--model <dir>``) and a tiny shape world, the demo's
order (probes -> steering -> SAE cache, training, evaluation -> approximations -> benchmark -> feature browser),
each step exiting 0 and checked for what a mishandled family would get wrong (image-token counts, token types,
rollout rows, heatmap coverage of the family's image-token layout)."""

from __future__ import annotations

import base64
import json
import math

import pytest
import torch
from conftest import FAMILY_KINDS

LAYER = 1
PAIRS = ("circle@square", "star@ring")
N_TRAIN_RECORDS, N_HELD_OUT = 3, 2  # SAE cache: captions [0, 3); evaluation and browser: [3, 5)


def _js(path, name: str):
    """The object a browser data file assigns to ``window.<name>``."""
    text = path.read_text(encoding="utf-8").strip()
    assert text.startswith(f"window.{name} = ")
    return json.loads(text[len(f"window.{name} = ") :].rstrip(";"))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_every_script_runs_on_the_family(kind, family_model_dir, small_world, run_in, tmp_path):
    from PIL import Image

    from lineofsight.data import ClassIndex, imagenet_items, read_sharegpt4v
    from lineofsight.hooks import Trace
    from lineofsight.io import open_tensors
    from lineofsight.models import (
        format_prompt,
        image_prompt,
        image_token_id,
        image_token_layout,
        image_token_mask,
        load_vlm,
        processor_inputs,
        residual_site,
    )
    from lineofsight.prompts import CAPTION_QUESTION

    model_dir = str(family_model_dir(kind))
    world = small_world
    captions = world / "sharegpt4v.json"
    records = read_sharegpt4v(captions)[: N_TRAIN_RECORDS + N_HELD_OUT]
    record_images = [Image.open(world / r.image).convert("RGB") for r in records]
    model, processor = load_vlm(model_dir)
    caption_prompt = format_prompt(processor, CAPTION_QUESTION)

    def n_image_tokens(prompt: str, image) -> int:
        """The processor's own count of the image's tokens in ``prompt``."""
        return int(image_token_mask(processor_inputs(processor, [prompt], [image])["input_ids"], model).sum())

    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(PAIRS) + "\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(sorted({c for p in PAIRS for c in p.split("@")})) + "\n")
    out = tmp_path / "out"

    def ok(script: str, *args: str):
        result = run_in(script, *args)
        assert result.returncode == 0, f"{script} on {kind}: {result.stderr[-3000:]}"
        return result

    # --- probes: each image's residual pooled over exactly its image tokens, with the family's image prompt ---
    ok("probes/compute_image_activations.py", "--model", model_dir, "--imagenet-dir", str(world / "imagenet"),
       "--split", "train", "--classes", str(classes), "--images-per-class", "2", "--layers", "0", str(LAYER),
       "--out", str(out / "acts"))
    (acts_dir,) = (out / "acts").iterdir()
    meta = json.loads((acts_dir / "metadata.json").read_text())
    assert meta["n_images"] == 8 and meta["prompt"] == image_prompt(model, processor)
    with open_tensors(acts_dir / "shard-00000.safetensors", "acts") as f:
        acts, item_index = f.get_tensor("acts"), f.get_tensor("item_index")
    items = imagenet_items(world / "imagenet", "train", meta["key"]["labels"], ClassIndex.read(world / "imagenet"), 2)
    image = Image.open(world / "imagenet" / items[int(item_index[0])].path).convert("RGB")
    inputs = processor_inputs(processor, [meta["prompt"]], [image])
    with torch.no_grad(), Trace(model, residual_site(model, LAYER), retain_input=True, stop=True) as trace:
        model(**inputs)
    mask = image_token_mask(inputs["input_ids"], model)[0]
    assert mask.sum() > 0
    torch.testing.assert_close(acts[0, 1], trace.input[0, mask].mean(0), atol=1e-4, rtol=1e-4)

    ok("probes/train_probe.py", "--activations", str(out / "acts"), "--pairs", str(pairs), "--epochs", "3",
       "--out", str(out / "probes"))
    assert json.loads((out / "probes" / "metrics.json").read_text())["n_classes"] == 4
    # --- steering ---
    ok("steering/compute_steering_vectors.py", "--activations", str(out / "acts"), "--pairs", str(pairs),
       "--out", str(out / "vectors"))
    ok("steering/steering_rollouts.py", "--model", model_dir, "--imagenet-dir", str(world / "imagenet"),
       "--vectors", str(out / "vectors"), "--layer", str(LAYER), "--n-pairs", "1", "--images-per-pair", "1",
       "--k", "0", "8", "--max-new-tokens", "4", "--out", str(out / "rollouts"))
    rollouts = [json.loads(line) for line in (out / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    n_questions = len(json.loads((out / "rollouts" / "rollouts_summary.json").read_text())["questions"])
    assert len(rollouts) == 2 * n_questions  # 1 pair x 1 image x 2 strengths x the questions
    assert all(r["text"].strip() and 0 < r["n_tokens"] <= 4 for r in rollouts)
    first = next(r for r in rollouts if r["k"] == 0)  # k = 0 is the model's own greedy answer
    inputs = processor_inputs(processor, [format_prompt(processor, first["prompt"])],
                              [Image.open(world / "imagenet" / first["image"]).convert("RGB")])
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert processor.tokenizer.decode(new, skip_special_tokens=True).strip() == first["text"]

    ok("steering/eval_steering.py", "--model", model_dir, "--imagenet-dir", str(world / "imagenet"),
       "--data", str(captions), "--vectors", str(out / "vectors"), "--layer", str(LAYER), "--n-pairs", "1",
       "--k", "0", "8", "--images-per-pair", "1", "--n-captions", "2", "--rollouts",
       str(out / "rollouts" / "rollouts.jsonl"), "--out", str(out / "steering"))
    by_k = json.loads((out / "steering" / "metrics.json").read_text())["metrics"][str(LAYER)]
    assert all(math.isfinite(v) for m in by_k.values() for v in m.values() if isinstance(v, float))
    assert by_k["0.0"]["p_tgt"] != by_k["8.0"]["p_tgt"]  # the vector reached the image tokens
    # --- SAEs: the cache holds each record's image tokens (the processor's count) and its caption in both passes ---
    ok("sae/cache_activations.py", "--model", model_dir, "--data", str(captions), "--layers", str(LAYER),
       "--limit", str(N_TRAIN_RECORDS), "--batch-size", "2", "--out", str(out / "cache"))
    (cache_dir,) = (out / "cache").iterdir()
    types = json.loads((cache_dir / "metadata.json").read_text())["token_types"]
    with open_tensors(cache_dir / "shard-00000.safetensors", "cache") as f:
        sample, token_id, type_index, token_type = (f.get_tensor(k) for k in ("sample", "token_id", "type_index",
                                                                              "token_type"))
    tok = processor.tokenizer
    for s, (rec, image) in enumerate(zip(records[:N_TRAIN_RECORDS], record_images)):
        rows = {t: (sample == s) & (token_type == types.index(t)) for t in types}
        assert int(rows["image"].sum()) == n_image_tokens(caption_prompt, image)
        assert (token_id[rows["image"]] == image_token_id(model)).all()
        for t in ("text_in_context", "text_only"):
            ids = token_id[rows[t]][type_index[rows[t]].argsort()]
            assert tok.decode(ids).strip() == rec.caption.strip(), (t, tok.decode(ids))
    ok("sae/sae-trainer.py", "--activations", str(out / "cache"), "--layer", str(LAYER), "--expansion", "2",
       "--lr", "1e-3", "--batch-size", "64", "--total-tokens", "320", "--dead-after-tokens", "10000",
       "--log-every", "1", "--out", str(out / "sae"))
    sae = out / "sae" / "saes" / f"L{LAYER}"
    assert json.loads((out / "sae" / "metrics.json").read_text())["tokens_seen"] >= 320
    held_out = ("--model", model_dir, "--data", str(captions), "--offset", str(N_TRAIN_RECORDS), "--limit",
                str(N_HELD_OUT))
    n_held_out_image = sum(n_image_tokens(caption_prompt, im) for im in record_images[N_TRAIN_RECORDS:])
    ok("sae/evaluation/eval_sae.py", "--sae", str(sae), *held_out, "--out", str(out / "eval"))
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluation["n_tokens"]["image"] == n_held_out_image
    assert all(evaluation["n_tokens"][t] > 0 for t in ("text_in_context", "text_only"))
    assert all(math.isfinite(v) for v in evaluation["ce"].values())
    ok("sae/evaluation/modality.py", "--saes", str(out / "sae"), *held_out, "--out", str(out / "modality"))
    modality = json.loads((out / "modality" / "modality.json").read_text())
    assert modality["layers"][str(LAYER)]["tokens_by_type"][0] == n_held_out_image
    ok("sae/approximate_steering_vectors.py", "--vectors", str(out / "vectors"), "--sae", str(sae), "--model",
       model_dir, "--basis", "sae", "neurons", "--lambdas", "1e-3", "--steps", "5", "--out", str(out / "approx"))
    approx = json.loads((out / "approx" / "approximation.json").read_text())
    assert approx["neurons"]["block"] == LAYER - 1 and len(approx["steering"]["per_vector"]) == len(PAIRS)
    # --- benchmark (the toy's MMMU-Pro copy), scored by the option letters' logits (the default) ---
    ok("sae/evaluation/eval_benchmark.py", "--model", model_dir, "--data", str(world / "benchmarks" / "mmmu_pro"),
       "--sae", str(out / "sae"), "--limit", "2", "--batch-size", "2", "--out", str(out / "benchmark"))
    predictions = [json.loads(line) for line in (out / "benchmark" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and all(set(p["pred"]) == {"clean", f"sae:L{LAYER}", f"zero:L{LAYER}"}
                                         for p in predictions)
    # --- the feature browser: a page per live latent, each image's heat over the family's image-token grids ---
    ok("sae/evaluation/browse_features.py", "--sae", str(sae), *held_out, "--top-n", "2", "--vectors",
       str(out / "vectors"), "--probes", str(out / "probes"), "--out", str(out / "browser"))
    index = _js(out / "browser" / "data" / "index.js", "LOS_INDEX")
    assert index["meta"]["n_tokens"]["image"] == n_held_out_image
    live = index["columns"]["id"]
    assert live and sorted(p.name for p in (out / "browser" / "data" / "latents").iterdir()) == sorted(
        f"{i}.js" for i in live)
    n_images = 0
    for i in live[:8]:
        page = _js(out / "browser" / "data" / "latents" / f"{i}.js", "LOS_LATENT")
        for shown in page["images"]:
            image = record_images[N_TRAIN_RECORDS + shown["record"]]
            layout = image_token_layout(model, processor, image.size)
            grids = page["layouts"][shown["layout"]]
            assert [(g["name"], tuple(g["shape"])) for g in grids] == [(g.name, g.shape) for g in layout.grids]
            cells = [len(base64.b64decode(h)) for h in shown["heat"]]
            assert cells == [g["shape"][0] * g["shape"][1] for g in grids]
            assert sum(cells) + len(layout.newlines) == layout.n_tokens == n_image_tokens(caption_prompt, image)
            n_images += 1
    assert n_images > 0
