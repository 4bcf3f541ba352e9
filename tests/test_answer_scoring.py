"""The answer as the model writes it: lineofsight.models.answer_token_ids, and eval_steering's sequence scoring
(the whole class name, teacher forced) against a full-logits reference; the forced-choice prompt's spacing."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, images, load_script, mistral_tokenizer

from lineofsight.models import answer_token_ids, format_prompt, image_token_mask, residual_site
from lineofsight.prompts import FORCED_CHOICE_TEMPLATE, MC_LETTERS, multiple_choice

eval_script = load_script("steering/eval_steering.py")

TOY_TEMPLATE = (ROOT / "data" / "toy" / "model" / "chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def toy():
    """The committed toy model and its processor (word-level tokenizer), loaded once."""
    from lineofsight.models import load_vlm

    return load_vlm("toy")


def _class_names() -> list[str]:
    lines = (ROOT / "data" / "single_word_classes.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _mistral_processors(tiny_models):
    """The tiny LLaVA-NeXT processor with the real Mistral v1 tokenizer: without a chat template (the
    MISTRAL_PROMPT form) and with the toy's llava-v1.6-mistral-style template."""
    import transformers

    plain = tiny_models("next-mistral")[1]
    templated = transformers.LlavaNextProcessor(
        image_processor=plain.image_processor, tokenizer=mistral_tokenizer(), patch_size=plain.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=TOY_TEMPLATE)
    return plain, templated


def test_answer_ids_of_the_steering_classes_with_the_mistral_tokenizer(tiny_models):
    plain, templated = _mistral_processors(tiny_models)
    tok = plain.tokenizer
    names = _class_names()
    assert len(names) == 100
    n_multi = 0
    for i, name in enumerate(names):
        question = FORCED_CHOICE_TEMPLATE.format(a=name, b=names[i - 1])
        prompt = format_prompt(plain, question)
        assert format_prompt(templated, question) == prompt
        ids = answer_token_ids(plain, prompt, name)
        assert answer_token_ids(templated, prompt, name) == ids
        assert tok.decode(ids).strip() == name
        # Reference: the chat template's own assistant turn, tokenized after the prompt, ends with EOS.
        turn = templated.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
             {"role": "assistant", "content": [{"type": "text", "text": name}]}], tokenize=False)
        full = tok(turn, add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert full[n_prompt:] == [*ids, tok.eos_token_id], name
        n_multi += len(ids) > 1
    # The first token alone is not the answer for 93 of the 100 names (the number the docs quote).
    assert n_multi == 93
    # Option letters of a multiple-choice item: one token each, with the leading space ("▁A").
    prompt = format_prompt(plain, multiple_choice("Which animal?", ["ibex", "ox"]))
    letters = [answer_token_ids(plain, prompt, letter) for letter in MC_LETTERS]
    assert all(len(ids) == 1 for ids in letters) and len({ids[0] for ids in letters}) == len(MC_LETTERS)
    assert tok.convert_ids_to_tokens(letters[0]) == ["▁A"]
    # A prompt whose last token would merge with the answer's first is refused, naming the answer.
    with pytest.raises(ValueError, match="answer 'goldfish'"):
        answer_token_ids(plain, prompt + " ", "goldfish")


def test_answer_ids_on_the_toy(toy):
    _, processor = toy
    tok = processor.tokenizer
    prompt = format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a="circle", b="star"))
    for name in ("circle", "star", "triangle"):
        assert answer_token_ids(processor, prompt, name) == [eval_script.first_token(tok, name)]
    with pytest.raises(ValueError, match="answer 'zebra'.*no token"):
        answer_token_ids(processor, prompt, "zebra")


def test_forced_choice_prompt_is_spaced_as_the_papers(toy):
    """'<image>\\n Reply' (the paper's code): other ids than '<image>\\nReply' for Mistral, the same for the toy's
    whitespace-split tokenizer, so the committed toy model reads what it was trained on."""
    question = FORCED_CHOICE_TEMPLATE.format(a="circle", b="star")
    unspaced = question.lstrip()
    assert question == " " + unspaced
    processor = toy[1]
    toy_tok = processor.tokenizer
    for image in (True, False):
        new, old = (toy_tok(format_prompt(processor, q, image=image))["input_ids"] for q in (question, unspaced))
        assert new == old
    caption = "a small red circle on a dark background"  # scripts/train_toy_vlm.py's text-only composition
    assert toy_tok(caption + " " + question)["input_ids"] == toy_tok(caption + " " + unspaced)["input_ids"]
    tok = mistral_tokenizer()
    prompt = format_prompt(processor, question)  # the same template as llava-v1.6-mistral's
    assert "<image>\n Reply either" in prompt
    tokens = tok.tokenize(prompt)
    assert tokens[tokens.index("<0x0A>") + 1].startswith("▁")  # "▁Rep" "ly", not "Re" "ply"
    assert tok(prompt)["input_ids"] != tok(format_prompt(processor, unspaced))["input_ids"]


def _reference_logp(model, processor, layer, case, k, positions):
    """log p(answer | prompt) for both answers by hand: one unpadded row (prompt ids + answer ids), full logits,
    ``k * v`` added by a plain forward pre-hook at the image tokens, the prompt, or every position."""
    out = {}
    for key in ("tgt_ids", "src_ids"):
        ids = case[key]
        inputs = processor(text=[case["prompt"]], images=[case["image"]], return_tensors="pt")
        n_prompt = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        mask = {"image": image_token_mask(inputs["input_ids"], model)[0],
                "prompt": torch.arange(inputs["input_ids"].shape[1]) < n_prompt,
                "all": torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)}[positions]

        def add(_module, args, kwargs, mask=mask):
            hidden = args[0] if args else kwargs["hidden_states"]
            edited = hidden + k * mask[None, :, None] * case["v"]
            return ((edited, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": edited})

        handle = model.get_submodule(residual_site(model, layer)).register_forward_pre_hook(add, with_kwargs=True)
        try:
            with torch.no_grad():
                logp = model(**inputs).logits[0].double().log_softmax(-1)
        finally:
            handle.remove()
        out[key] = sum(float(logp[n_prompt - 1 + j, t]) for j, t in enumerate(ids))
    return out


@pytest.mark.parametrize("positions", ["image", "prompt", "all"])
def test_sequence_scores_equal_a_full_logits_reference(tiny_models, positions):
    """Answers of 1 to 4 tokens in one batch, left padding, ragged batches, steering on: the sequence scores
    (logits of the last n_max positions only) equal a one-row full-logits computation."""
    model, processor = tiny_models("next-mistral")
    processor.tokenizer.padding_side = "left"
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    pairs = [("ox", "hartebeest"), ("porcupine", "ibex"), ("lion", "ant"), ("orangutan", "weasel")]
    cases = []
    for (src, tgt), image in zip(pairs, images([(64, 64), (48, 80), (32, 32), (64, 40)], seed=5)):
        prompt = format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a=src, b=tgt))
        cases.append({"image": image, "prompt": prompt, "v": v, "tgt_ids": answer_token_ids(processor, prompt, tgt),
                      "src_ids": answer_token_ids(processor, prompt, src)})
    assert sorted({len(c[key]) for c in cases for key in ("tgt_ids", "src_ids")}) == [1, 2, 3, 4]
    got = eval_script.answer_scores(model, processor, 2, cases, [0.0, 3.0], positions, 3, "sequence")
    for g, case in zip(got[3.0], cases):
        want = _reference_logp(model, processor, 2, case, 3.0, positions)
        for key in ("tgt_ids", "src_ids"):
            assert g[key] == pytest.approx(want[key], rel=0, abs=5e-5)  # agree to ~3e-6 (float32, left padding)
    assert got[3.0][1]["tgt_ids"] != pytest.approx(got[0.0][1]["tgt_ids"], abs=1e-3)  # steering moved the score


def test_sequence_equals_first_token_on_the_toys_one_token_names(toy, small_world):
    from lineofsight.data import load_image

    model, processor = toy
    processor.tokenizer.padding_side = "left"
    tok = processor.tokenizer
    v = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    paths = sorted((small_world / "imagenet" / "val").rglob("*.png"))[:4]
    cases = []
    for i, path in enumerate(paths):
        src, tgt = ("circle", "star") if i % 2 else ("square", "triangle")
        prompt = format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a=src, b=tgt))
        cases.append({"image": load_image(path), "prompt": prompt, "v": v,
                      "tgt_ids": [eval_script.first_token(tok, tgt)], "src_ids": [eval_script.first_token(tok, src)]})
        assert answer_token_ids(processor, prompt, tgt) == cases[-1]["tgt_ids"]
    strengths = [0.0, 8.0]
    first = eval_script.efficacy(model, processor, 2, cases, strengths, "image", 3, "first-token")
    sequence = eval_script.efficacy(model, processor, 2, cases, strengths, "image", 3, "sequence")
    for k in strengths:
        for name in ("p_tgt", "p_src"):
            assert sequence[k][name] == pytest.approx(first[k][name], rel=1e-5, abs=1e-7)
        assert sequence[k]["flip_rate"] == first[k]["flip_rate"]
    assert first[8.0]["p_tgt"] != pytest.approx(first[0.0]["p_tgt"], rel=1e-3)


@pytest.mark.parametrize("kind", ["gemma3", "qwen2_5_vl"])
def test_sequence_scores_keep_the_families_token_types(tiny_models, kind):
    """Gemma 3's ``token_type_ids`` and Qwen2.5-VL's ``mm_token_type_ids`` are shifted with the appended answer ids
    (ragged answers, left padding): the scores equal a plain forward of the processor's own inputs for prompt +
    answer text."""
    from lineofsight.models import assistant_prefix, processor_inputs

    model, processor = tiny_models(kind)
    tok = processor.tokenizer
    tok.padding_side = "left"
    v = torch.zeros(model.config.get_text_config().hidden_size)
    cases = []
    for (src, tgt), image in zip([("circle", "square star"), ("red ring", "blue")], images([(64, 64), (48, 80)])):
        prompt = format_prompt(processor, FORCED_CHOICE_TEMPLATE.format(a=src, b=tgt))
        cases.append({"image": image, "prompt": prompt, "v": v, "tgt_ids": answer_token_ids(processor, prompt, tgt),
                      "src_ids": answer_token_ids(processor, prompt, src), "answers": (tgt, src)})
    assert len({len(c[key]) for c in cases for key in ("tgt_ids", "src_ids")}) > 1
    got = eval_script.answer_scores(model, processor, 1, cases, [0.0], "image", 4, "sequence")[0.0]
    for g, case in zip(got, cases):
        for key, answer in zip(("tgt_ids", "src_ids"), case["answers"]):
            inputs = processor_inputs(processor, [case["prompt"] + assistant_prefix(processor) + answer],
                                      [case["image"]])
            ids = case[key]
            assert inputs["input_ids"][0, -len(ids):].tolist() == ids
            with torch.no_grad():
                logp = model(**inputs).logits[0, -len(ids) - 1 : -1].double().log_softmax(-1)
            want = float(logp.gather(-1, torch.tensor(ids)[:, None]).sum())
            assert g[key] == pytest.approx(want, abs=5e-5)
