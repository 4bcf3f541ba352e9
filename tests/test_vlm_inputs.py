"""lineofsight.models.vlm_inputs: each distinct image preprocessed and encoded once per batch, with
exactly the ids, mask and logits of the batched processor call."""

from __future__ import annotations

import pytest
import torch
from conftest import images, pixels_only

from lineofsight.models import format_prompt, vlm_inputs
from lineofsight.prompts import ROLLOUT_QUESTIONS

# 2 images of different sizes (LLaVA-NeXT expands them into different numbers of image tokens) x 3
# prompts, rows interleaved and some repeated: a k sweep over several questions.
SIZES = [(40, 24), (24, 64)]
ROWS = [(0, 0), (1, 1), (0, 2), (1, 0), (0, 0), (1, 2)]


def _batch(processor):
    pics = images(SIZES, seed=3)
    prompts = [format_prompt(processor, q) for q in ROLLOUT_QUESTIONS[:3]]
    return [pics[i] for i, _ in ROWS], [prompts[j] for _, j in ROWS]


def _vision_tower(model):
    return next(module for name, module in model.named_modules() if name.endswith("vision_tower"))


@pytest.mark.parametrize("kind", ["next-mistral", "llava15"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_ids_and_mask_equal_the_batched_processor(tiny_models, kind, padding_side, monkeypatch):
    model, processor = tiny_models(kind)
    monkeypatch.setattr(processor.tokenizer, "padding_side", padding_side)
    row_images, row_prompts = _batch(processor)
    ref = processor(text=row_prompts, images=row_images, return_tensors="pt", padding=True)
    ours = vlm_inputs(model, processor, row_images, row_prompts)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    if kind.startswith("next"):  # the two sizes really expand differently
        n_image_tokens = (ref["input_ids"] == processor.image_token_id).sum(1)
        assert n_image_tokens[0] != n_image_tokens[1]


@pytest.mark.parametrize("kind", ["next-mistral", "llava15"])
@pytest.mark.parametrize("features", [True, False])
def test_logits_equal_the_batched_processor(tiny_models, kind, features, monkeypatch):
    model, processor = tiny_models(kind)
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")
    row_images, row_prompts = _batch(processor)
    ref = processor(text=row_prompts, images=row_images, return_tensors="pt", padding=True)
    if not features:  # a model whose forward takes pixels only
        pixels_only(model, monkeypatch)
    ours = vlm_inputs(model, processor, row_images, row_prompts)
    assert ("mm_encoder_outputs" in ours) == features and ("pixel_values" in ours) != features
    if not features:
        assert ours["pixel_values"].shape[0] == len(ROWS)
    with torch.no_grad():
        expected = model(**ref).logits
        got = model(**ours).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["next-mistral", "llava15"])
def test_each_distinct_image_preprocessed_and_encoded_once(tiny_models, kind, monkeypatch):
    model, processor = tiny_models(kind)
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")
    row_images, row_prompts = _batch(processor)
    n_distinct = len(SIZES)

    preprocessed = []  # images seen by each image-processor call
    preprocess = processor.image_processor.preprocess
    monkeypatch.setattr(processor.image_processor, "preprocess",
                        lambda imgs, *a, **kw: preprocessed.append(len(imgs)) or preprocess(imgs, *a, **kw))
    encoded = []  # images seen by each get_image_features call
    features = model.get_image_features
    monkeypatch.setattr(model, "get_image_features",
                        lambda **kw: encoded.append(kw["pixel_values"].shape[0]) or features(**kw))
    tower_rows = []  # crops seen by each vision tower forward (LLaVA-NeXT: base + anyres tiles)
    handle = _vision_tower(model).register_forward_hook(
        lambda module, args, kwargs, out: tower_rows.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    try:
        vlm_inputs(model, processor, row_images, row_prompts)
        assert sum(preprocessed) == n_distinct, preprocessed
        assert encoded == [n_distinct]
        n_tower_calls, n_crops = len(tower_rows), sum(tower_rows)
        # The crops of the 2 distinct images alone, encoded directly: what the tower must see.
        tower_rows.clear()
        pixels = processor.image_processor(row_images[:n_distinct], return_tensors="pt")
        with torch.no_grad():
            features(pixel_values=pixels["pixel_values"],
                     **({"image_sizes": pixels["image_sizes"]} if "image_sizes" in pixels else {}))
    finally:
        handle.remove()
    assert n_tower_calls == 1 and n_crops == sum(tower_rows)


def test_ten_questions_one_image(tiny_models, monkeypatch):
    """The paper's ten questions about one image: one image preprocessed, one encoded, same ids."""
    model, processor = tiny_models("next-mistral")
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")
    image = images([(48, 32)], seed=5)[0]
    prompts = [format_prompt(processor, q.format(src="cat", tgt="dog")) for q in ROLLOUT_QUESTIONS]
    encoded = []
    features = model.get_image_features
    monkeypatch.setattr(model, "get_image_features",
                        lambda **kw: encoded.append(kw["pixel_values"].shape[0]) or features(**kw))
    ours = vlm_inputs(model, processor, [image] * len(prompts), prompts)
    ref = processor(text=prompts, images=[image] * len(prompts), return_tensors="pt", padding=True)
    assert encoded == [1]
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])


def test_prompt_without_one_placeholder_is_refused(tiny_models):
    model, processor = tiny_models("llava15")
    image = images([(32, 32)])[0]
    with pytest.raises(ValueError, match="exactly one"):
        vlm_inputs(model, processor, [image], ["no placeholder here"])
