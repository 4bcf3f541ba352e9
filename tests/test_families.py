"""The project's invariants on every supported family (LLaVA-NeXT as the reference, LLaVA-OneVision, Qwen2.5-VL,
Gemma 3, Idefics3): tiny random models built from config, each family's processor with its checkpoint's real chat
template (tests/family_<kind>.py, tests/data/chat_templates/)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_KINDS, images, load_script

from lineofsight.harvest import TOKEN_TYPES, Harvester
from lineofsight.hooks import Trace
from lineofsight.models import (
    family,
    format_prompt,
    image_token_id,
    image_token_mask,
    n_layers,
    residual_site,
    vlm_inputs,
)
from lineofsight.steering import steer

KINDS = ("next-mistral", *FAMILY_KINDS)
QUESTIONS = ("What is shown in this image?", "Is the shape red?")
SIZES = [(64, 96), (40, 36)]

rollouts = load_script("steering/steering_rollouts.py")


def _processor_batch(processor, prompts, pics, padding_side="left"):
    """The processor's own batched call (images nested per row)."""
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = padding_side
    try:
        return processor(text=prompts, images=[[im] for im in pics], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side


def _rows(processor):
    """Rows that repeat images and prompts (a steering sweep's shape): 2 images x 2 questions, 5 rows."""
    pics = images(SIZES, seed=2)
    prompts = [format_prompt(processor, q) for q in QUESTIONS]
    order = [(0, 0), (1, 1), (0, 1), (1, 0), (0, 0)]
    return [pics[i] for i, _ in order], [prompts[j] for _, j in order]


@pytest.mark.parametrize("kind", KINDS)
def test_trace_at_residual_site_is_hidden_states(tiny_models, kind):
    model, processor = tiny_models(kind)
    inputs = _processor_batch(processor, [format_prompt(processor, QUESTIONS[0])] * 2, images(SIZES, seed=1))
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        for layer in range(n_layers(model)):
            with Trace(model, residual_site(model, layer), retain_input=True, stop=True) as tr:
                model(**inputs)
            assert torch.equal(tr.input, hidden[layer]), layer


@pytest.mark.parametrize("kind", KINDS)
def test_image_mask_is_exactly_where_image_features_land(tiny_models, kind):
    """Perturb the image features the forward scatters: the positions of block 0's input that change are the
    image-token mask (marker tokens such as <|vision_start|>, <start_of_image>, <row_1_col_1> are not)."""
    model, processor = tiny_models(kind)
    pics, prompts = _rows(processor)
    inputs = vlm_inputs(model, processor, pics, prompts)
    features = inputs["mm_encoder_outputs"]["image"].pooler_output
    with torch.no_grad():
        with Trace(model, residual_site(model, 0), retain_input=True, stop=True) as tr:
            model(**inputs)
        clean = tr.input
        bumped = [f + 1.0 for f in features] if isinstance(features, (list, tuple)) else features + 1.0
        inputs["mm_encoder_outputs"]["image"].pooler_output = bumped
        with Trace(model, residual_site(model, 0), retain_input=True, stop=True) as tr:
            model(**inputs)
    changed = (tr.input != clean).any(-1)
    mask = image_token_mask(inputs["input_ids"], model)
    assert torch.equal(changed, mask)
    assert mask.any() and (inputs["attention_mask"].bool() & ~mask).any()


@pytest.mark.parametrize("kind", KINDS)
def test_vlm_inputs_equal_the_processor(tiny_models, kind):
    """Each distinct image encoded once, rows indexing into it: the ids, mask and logits of the processor's batched
    call on every row."""
    model, processor = tiny_models(kind)
    pics, prompts = _rows(processor)
    calls = []
    encode = model.get_image_features

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    model.get_image_features = counting
    try:
        ours = vlm_inputs(model, processor, pics, prompts)
    finally:
        del model.get_image_features
    ref = _processor_batch(processor, prompts, pics, padding_side=processor.tokenizer.padding_side)
    assert len(calls) == 1
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    with torch.no_grad():
        got, expected = model(**ours).logits, model(**ref).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_vlm_inputs_pixel_path_equals_the_processor(tiny_models, kind, monkeypatch):
    """For a forward that takes no precomputed features, vlm_inputs gives each row its image's pixels (Qwen2.5-VL:
    its flat patch rows and grid): the processor's logits again."""
    model, processor = tiny_models(kind)
    pics, prompts = _rows(processor)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kwargs: forward(**kwargs))  # no mm_encoder_outputs parameter
    ours = vlm_inputs(model, processor, pics, prompts)
    assert "mm_encoder_outputs" not in ours and "pixel_values" in ours
    ref = _processor_batch(processor, prompts, pics, padding_side=processor.tokenizer.padding_side)
    with torch.no_grad():
        torch.testing.assert_close(model(**ours).logits, model(**ref).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_steering_at_image_positions_prefill_only_and_batch_independent(tiny_models, kind):
    """At the layer, exactly the image positions get the vector; decoding steps are never edited; and a left-padded
    batch of two rows decodes each row as it decodes alone."""
    model, processor = tiny_models(kind)
    pics, prompts = _rows(processor)
    pics, prompts = pics[:2], prompts[:2]
    d_model = model.get_input_embeddings().weight.shape[1]
    delta = torch.randn(2, d_model, generator=torch.Generator().manual_seed(0)) * 4
    layer = 2
    processor.tokenizer.padding_side = "left"
    inputs = vlm_inputs(model, processor, pics, prompts)
    seen = []  # (edited input, raw input) of every forward at the layer, in call order
    site = model.get_submodule(residual_site(model, layer))
    raw_hook = site.register_forward_pre_hook(lambda m, args, kwargs: seen.append([args[0] if args else
                                                                                   kwargs["hidden_states"]]),
                                              with_kwargs=True)
    try:
        with torch.no_grad(), steer(model, layer, delta, inputs["input_ids"], inputs["attention_mask"], "image"):
            after = site.register_forward_pre_hook(
                lambda m, args, kwargs: seen[-1].append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
            try:
                batched = rollouts.greedy_decode(model, inputs, 5, eos_id=-1, pad_id=processor.tokenizer.pad_token_id)
            finally:
                after.remove()
    finally:
        raw_hook.remove()
    mask = image_token_mask(inputs["input_ids"], model)
    (raw, edited), *steps = seen
    assert torch.equal(edited, raw + mask[..., None] * delta[:, None, :].to(raw.dtype))
    assert steps and all(torch.equal(r, e) for r, e in steps)  # cached steps: one new token, never edited
    for row in range(2):
        alone = vlm_inputs(model, processor, [pics[row]], [prompts[row]])
        with torch.no_grad(), steer(model, layer, delta[row : row + 1], alone["input_ids"], alone["attention_mask"],
                                    "image"):
            one = rollouts.greedy_decode(model, alone, 5, eos_id=-1, pad_id=processor.tokenizer.pad_token_id)
        assert torch.equal(one[0], batched[row]), row


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_decode_equals_generate(tiny_models, kind):
    """The rollouts' KV-cached loop on vlm_inputs (precomputed features) gives generate's tokens on the processor's
    left-padded batch (M-RoPE positions for Qwen2.5-VL, Gemma 3's bidirectional image attention in prefill)."""
    model, processor = tiny_models(kind)
    pics, prompts = _rows(processor)
    pics, prompts = pics[:2], prompts[:2]
    tok = processor.tokenizer
    tok.padding_side = "left"
    ref_inputs = _processor_batch(processor, prompts, pics)
    with torch.no_grad():
        ref = model.generate(**ref_inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)[:, ref_inputs["input_ids"].shape[1]:]
        ours = rollouts.greedy_decode(model, vlm_inputs(model, processor, pics, prompts), 6, eos_id=-1,
                                      pad_id=tok.pad_token_id)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_harvest_token_types_with_the_real_chat_template(tiny_models, kind):
    """Pass 1 keeps exactly the image-feature positions (type image) and the caption's tokens after the family's
    prompt and turn prefix (text_in_context); nothing of the template (markers, question, turn tokens)."""
    model, processor = tiny_models(kind)
    captions = ["A red circle on a blue background.", "A small green star."]
    harvester = Harvester(model, processor, [1, 2], max_caption_tokens=64)
    inputs, keep, kind_BT = harvester.prepare_with_image(captions, images(SIZES, seed=4))
    ids = inputs["input_ids"]
    image = image_token_mask(ids, model)
    assert torch.equal(kind_BT == TOKEN_TYPES.index("image"), image)
    assert torch.equal(keep, kind_BT >= 0)
    tok = processor.tokenizer
    for row, caption in enumerate(captions):
        in_context = ids[row][kind_BT[row] == TOKEN_TYPES.index("text_in_context")].tolist()
        assert in_context == harvester.caption_token_ids(caption)["text_in_context"]
        assert tok.decode(in_context).strip() == caption
    batch = harvester(captions, images(SIZES, seed=4), [0, 1])
    assert (batch.token_id[batch.token_type == 0] == image_token_id(model)).all()
    assert family(model).model_type in (kind.split("-")[0].replace("next", "llava_next"), kind)
