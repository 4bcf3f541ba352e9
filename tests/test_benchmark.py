"""The multiple-choice benchmark splice: the Hugging Face schemas read from every kind of local copy with what is
skipped counted, the batched forked forward equal to one plain forward per condition and item, and the script end
to end (exact-reconstruction SAE = clean; one-line errors)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import load_script

from lineofsight.cli import UserError
from lineofsight.data import SkipCounter

MMMU_IMAGES = [f"image_{i}" for i in range(1, 8)]


def _png(seed: int) -> bytes:
    from lineofsight.toy import render_sample

    buf = io.BytesIO()
    render_sample(0, "heldout", seed).image.save(buf, format="PNG")
    return buf.getvalue()


def _image(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def _mmmu_features(with_type: bool):
    import datasets

    cols = {"id": datasets.Value("string"), "question": datasets.Value("string"),
            "options": datasets.Value("string"), "explanation": datasets.Value("string"),
            **{c: datasets.Image() for c in MMMU_IMAGES}, "answer": datasets.Value("string"),
            "topic_difficulty": datasets.Value("string")}
    if with_type:
        cols.update(img_type=datasets.Value("string"), question_type=datasets.Value("string"),
                    subfield=datasets.Value("string"))
    else:
        cols.update(image_type=datasets.Value("string"), subject=datasets.Value("string"))
    return datasets.Features(cols)


def _mmmu_rows(rows: list[dict], with_type: bool = False) -> object:
    """A datasets.Dataset in MMMU-Pro's (or, ``with_type``, MMMU's) columns from short row specs."""
    import datasets

    full = []
    for r in rows:
        imgs = r.get("images", [_png(len(full))])
        row = {"id": r["id"], "question": r.get("question", "Which shape is shown?"), "options": r["options"],
               "explanation": "", "answer": r["answer"], "topic_difficulty": "Easy",
               **{c: _image(imgs[i]) if i < len(imgs) else None for i, c in enumerate(MMMU_IMAGES)}}
        if with_type:
            row.update(img_type="['Diagrams']", question_type=r.get("question_type", "multiple-choice"), subfield="x")
        else:
            row.update(image_type="Diagrams", subject=r.get("subject", "Shape"))
        full.append(row)
    return datasets.Dataset.from_list(full, features=_mmmu_features(with_type))


PRO_ROWS = [
    {"id": "ok_two_images", "options": "['circle', 'square', 'star', 'ring']", "answer": "B",
     "images": [_png(1), _png(2)]},
    {"id": "bad_options", "options": "circle, square", "answer": "A"},
    {"id": "bad_answer", "options": "['circle', 'square', 'star', 'ring']", "answer": "E"},
    {"id": "no_image", "options": "['circle', 'square']", "answer": "A", "images": []},
    {"id": "unreadable", "options": "['circle', 'square']", "answer": "A", "images": [b"not an image"]},
    {"id": "ok", "options": "['red', 'green', 'blue']", "answer": "C", "subject": "Colour"},
]


def test_reads_the_three_schemas_from_disk_and_parquet_and_counts_what_it_skips(tmp_path):
    import datasets

    from lineofsight.benchmarks import read_items

    pro = _mmmu_rows(PRO_ROWS)
    datasets.DatasetDict({"test": pro}).save_to_disk(str(tmp_path / "pro"))
    parquet = tmp_path / "pro_hub" / "standard (4 options)"
    parquet.mkdir(parents=True)
    pro.to_parquet(str(parquet / "test-00000-of-00001.parquet"))
    for source in (tmp_path / "pro", tmp_path / "pro_hub"):
        skips, counts = SkipCounter(), {}
        items = list(read_items("mmmu-pro", str(source), skips=skips, counts=counts))
        assert [(it.id, it.answer, it.options, it.subject) for it in items] == [
            ("ok_two_images", 1, ["circle", "square", "star", "ring"], "Shape"),
            ("ok", 2, ["red", "green", "blue"], "Colour")]
        assert items[0].image.mode == "RGB" and items[0].image.size == (64, 64)
        assert dict(skips.counts) == {"bad options": 1, "bad answer": 1, "no image": 1, "unreadable image": 1}
        assert counts == {"n_rows": 6, "n_multi_image": 1}
    (item,) = read_items("mmmu-pro", str(tmp_path / "pro"), subjects=("Colour",), resize=20)
    assert item.id == "ok" and item.image.size == (20, 20)
    assert len(list(read_items("mmmu-pro", str(tmp_path / "pro"), limit=1))) == 1

    aok = datasets.Dataset.from_list(
        [{"question_id": "q1", "image": _image(_png(3)), "question": "Which shape?", "choices": ["star", "ring"],
          "correct_choice_idx": 1, "direct_answers": ["ring"], "difficult_direct_answer": False, "rationales": []},
         {"question_id": "q2", "image": _image(_png(4)), "question": "Which shape?", "choices": ["star", "ring"],
          "correct_choice_idx": 5, "direct_answers": [], "difficult_direct_answer": False, "rationales": []}],
        features=datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                    "question": datasets.Value("string"), "choices": [datasets.Value("string")],
                                    "correct_choice_idx": datasets.Value("int8"),
                                    "direct_answers": [datasets.Value("string")],
                                    "difficult_direct_answer": datasets.Value("bool"),
                                    "rationales": [datasets.Value("string")]}))
    datasets.DatasetDict({"validation": aok}).save_to_disk(str(tmp_path / "aok"))
    skips = SkipCounter()
    (item,) = read_items("aokvqa", str(tmp_path / "aok"), skips=skips)
    assert (item.id, item.answer, item.letter, item.subject) == ("q1", 1, "B", "aokvqa")
    assert dict(skips.counts) == {"bad answer": 1}

    for subject, rows in (("Art", [{"id": "validation_Art_1", "options": "['a', 'b', 'c', 'd']", "answer": "D"},
                                   {"id": "validation_Art_2", "options": "[]", "answer": "42",
                                    "question_type": "open"}]),
                          ("Math", [{"id": "validation_Math_1", "options": "['1', '2']", "answer": "A"}])):
        datasets.DatasetDict({"validation": _mmmu_rows(rows, with_type=True)}).save_to_disk(
            str(tmp_path / "mmmu" / subject))
    counts = {}
    items = list(read_items("mmmu", str(tmp_path / "mmmu"), counts=counts))
    assert [(it.id, it.subject, it.letter) for it in items] == [("validation_Art_1", "Art", "D"),
                                                                ("validation_Math_1", "Math", "A")]
    assert counts["n_open"] == 1 and counts["n_rows"] == 3

    with pytest.raises(UserError, match="not in the MMMU-Pro schema: no column options, answer, image_1 "):
        list(read_items("mmmu-pro", str(tmp_path / "aok"), split="validation"))
    with pytest.raises(UserError, match="no split 'test'"):
        list(read_items("mmmu-pro", str(tmp_path / "aok")))
    with pytest.raises(UserError, match="neither a save_to_disk folder nor parquet"):
        list(read_items("mmmu-pro", str(tmp_path)))
    with pytest.raises(UserError, match="not an MMMU subject: Alchemy"):
        list(read_items("mmmu", str(tmp_path / "mmmu"), subjects=("Alchemy",)))


def _identity_sae(d: int, layer: int, model: str = ""):
    """A ReLU SAE whose reconstruction is its input exactly: latents are the positive and negative parts."""
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, act_scale=2.0, layer=layer, model=model))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.eval()


def test_one_forked_forward_equals_a_plain_forward_per_condition_and_item(tmp_path):
    """Clean, two SAEs at two layers and the zero floor in one batched forward: the logits of every condition and
    item equal a batch-1 forward of that item with that splice alone; the greedy choice equals the paper's loop
    (generate one token, batch 1, no cache)."""
    from lineofsight.benchmarks import Item
    from lineofsight.hooks import Trace
    from lineofsight.models import format_prompt, image_token_mask, layer_names, load_vlm, vlm_inputs
    from lineofsight.prompts import MC_LETTERS, multiple_choice
    from lineofsight.sae import SAEConfig, SparseAutoencoder
    from lineofsight.toy import render_sample

    script = load_script("sae/evaluation/eval_benchmark.py")
    model, processor = load_vlm("toy")
    processor.tokenizer.padding_side = "left"
    d = model.config.text_config.hidden_size
    saes = [("a", SparseAutoencoder(SAEConfig(d_in=d, d_sae=4 * d, layer=1, act_scale=0.5), seed=3).eval()),
            ("b", SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, layer=3, activation="topk", k=8), seed=4).eval())]
    splices = script.conditions_of(saes, zero_ablate=True)
    names = ["clean", *(sp.name for sp in splices)]
    assert names == ["clean", "sae:a", "sae:b", "zero:L1", "zero:L3"]
    questions = [("Which shape is shown in this image?", ["circle", "square", "star", "ring"]),
                 ("What colour is the shape?", ["red", "green", "blue"])]
    items = [Item(f"i{i}", "s", *questions[i % 2], 0, render_sample(0, "heldout", 40 + i).image) for i in range(3)]
    logits = script.forward_conditions(model, processor, items, splices, fork_rows=4)
    assert logits.shape == (len(names) * len(items), model.config.text_config.vocab_size)
    for v, sp in enumerate([None, *splices]):
        for b, it in enumerate(items):
            inputs = vlm_inputs(model, processor, [it.image], [format_prompt(processor, multiple_choice(
                it.question, it.options))])
            mask = image_token_mask(inputs["input_ids"], model)[0]

            def splicer(sae, mask):
                def edit(x):
                    x = x.clone()
                    x[0, mask] = 0 if sae is None else sae(x[0, mask])[0]
                    return x

                return edit

            with torch.no_grad():
                if sp is None:
                    ref = model(**inputs, use_cache=False).logits[0, -1]
                else:
                    with Trace(model, layer_names(model)[sp.layer], retain_output=False,
                               edit_input=splicer(sp.sae, mask)):
                        ref = model(**inputs, use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[v * len(items) + b], ref.float(), atol=2e-4, rtol=1e-4)
    letters = script.option_letters(processor, 4)
    assert letters.texts == ["a", "b", "c", "d"]  # the toy's tokenizer lowercases
    preds = script.choices(logits, items, names, letters, processor.tokenizer)
    for b, it in enumerate(items):  # the paper's loop on the clean model
        inputs = vlm_inputs(model, processor, [it.image], [format_prompt(processor, multiple_choice(
            it.question, it.options))])
        with torch.no_grad():
            token = model.generate(**inputs, max_new_tokens=1, do_sample=False, use_cache=False)[0, -1]
        text = processor.tokenizer.decode([int(token)]).strip().upper()
        expected = MC_LETTERS.index(text) if text in tuple(MC_LETTERS[: len(it.options)]) else None
        assert preds[b]["clean"]["greedy"] == expected
        assert preds[b]["clean"]["logits"] == int(logits[b, letters.ids[: len(it.options)]].argmax())


def test_script_end_to_end_exact_sae_equals_clean_and_bad_input_is_one_line(tmp_path, capsys):
    import datasets

    from lineofsight.cli import run as run_cli
    from lineofsight.models import load_vlm
    from lineofsight.toy import render_sample

    rows = []
    for i in range(6):
        s = render_sample(0, "heldout", 60 + i)
        opts = [s.cls, *[c for c in ("circle", "square", "star", "ring") if c != s.cls][:3]]
        rows.append({"id": f"t{i}", "options": repr(opts), "answer": "A", "subject": ["Shape", "Other"][i % 2],
                     "images": [_png(60 + i)]})
    rows.append({"id": "no_image", "options": "['circle', 'square']", "answer": "A", "images": []})
    datasets.DatasetDict({"test": _mmmu_rows(rows)}).save_to_disk(str(tmp_path / "pro"))
    model, _ = load_vlm("toy")
    sae = _identity_sae(model.config.text_config.hidden_size, layer=2)
    sae.save(tmp_path / "sae")
    script = load_script("sae/evaluation/eval_benchmark.py")
    out = tmp_path / "out"
    result = script.main(script.Config(data=str(tmp_path / "pro"), sae=(tmp_path / "sae",), out=out, batch_size=4))
    assert list(result["conditions"]) == ["clean", "sae:sae", "zero:L2"]
    assert result["n_items"] == 6 and result["skipped"]["counts"] == {"no image": 1}
    assert result["chance"] == pytest.approx(0.25)
    clean, spliced = result["conditions"]["clean"], result["conditions"]["sae:sae"]
    assert spliced["n_correct"] == clean["n_correct"] and spliced["vs_clean"]["diff"] == 0.0
    assert spliced["vs_clean"]["a_only"] == spliced["vs_clean"]["b_only"] == 0
    assert set(result["by_subject"]) == {"Shape", "Other"} and result["by_subject"]["Shape"]["n"] == 3
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in lines] == [f"t{i}" for i in range(6)]
    assert all(p["pred"]["sae:sae"] == p["pred"]["clean"] for p in lines)
    assert (out / "accuracy.png").stat().st_size > 0 and json.loads((out / "metrics.json").read_text()) == \
        json.loads(json.dumps(result))

    def error(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_cli(script.main, script.Config, list(args))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]  # progress
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, lines
        return lines[0]

    assert "toy world has no MMMU copy" in error("--benchmark", "mmmu", "--out", str(tmp_path / "x"))
    assert "neither a save_to_disk folder nor parquet" in error("--data", str(tmp_path), "--out", str(tmp_path / "x"))
    assert "--batch-size must be positive" in error("--batch-size", "0")
    big = _identity_sae(64, layer=2)
    big.save(tmp_path / "wide")
    assert "does not match the model's d_model" in error("--data", str(tmp_path / "pro"), "--sae",
                                                          str(tmp_path / "wide"), "--out", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
