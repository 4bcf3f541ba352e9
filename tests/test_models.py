"""lineofsight.models: layers by structure, image-token masks, prompts, loading, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, images, mistral_tokenizer, pixels_only

from lineofsight.cli import UserError
from lineofsight.models import (
    check_layer,
    format_prompt,
    image_token_mask,
    layer_names,
    load_vlm,
    n_layers,
    residual_site,
    vlm_inputs,
)

QUESTION = "What is shown in this image?"
# The LLaVA-NeXT-Mistral prompt for QUESTION as the paper's code hard-coded it
# (<s> [INST] ▁ <image> \n What is shown in this image ? [/INST]), before <image> is expanded.
PAPER_IDS = [1, 733, 16289, 28793, 28705, 32000, 13, 3195, 349, 4894, 297, 456, 3469, 28804,
             733, 28748, 16289, 28793]


@pytest.mark.parametrize("kind", ["next-mistral", "next-llama", "next-qwen2", "llava15"])
def test_layer_names_by_structure(tiny_models, kind):
    model, _ = tiny_models(kind)
    names = layer_names(model)
    assert len(names) == model.config.text_config.num_hidden_layers == n_layers(model)
    for name in names:
        block = model.get_submodule(name)
        assert "DecoderLayer" in type(block).__name__
    # The vision tower's encoder layers are never mistaken for the decoder.
    assert not any("vision" in name for name in names)


def test_layer_names_when_vision_depth_equals_text_depth():
    model, _ = build_tiny("next-mistral", n_layers=2)  # the tiny CLIP tower also has 2 layers
    assert layer_names(model) == [f"model.language_model.layers.{i}" for i in range(2)]


def test_check_layer_range(tiny_models):
    model, _ = tiny_models("next-mistral")
    n = n_layers(model)
    assert check_layer(model, 0) == 0 and check_layer(model, n) == n
    for bad in (-1, n + 1):
        with pytest.raises(UserError, match=rf"valid layers are 0\.\.{n}"):
            residual_site(model, bad)


@pytest.mark.parametrize("kind", ["next-mistral", "llava15"])
def test_processor_token_counts_match_model(tiny_models, kind):
    model, processor = tiny_models(kind)
    processor.tokenizer.padding_side = "left"
    prompt = format_prompt(processor, QUESTION)
    for size in [(64, 64), (48, 80), (100, 40), (33, 97), (200, 201)]:
        inputs = processor(text=[prompt], images=images([size]), return_tensors="pt")
        n_tokens = int(image_token_mask(inputs["input_ids"], model).sum())
        with torch.no_grad():
            extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            feats = model.get_image_features(pixel_values=inputs["pixel_values"], **extra)
            feats = feats if isinstance(feats, (list, tuple)) else getattr(feats, "pooler_output", feats)
            n_features = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
            model(**inputs)  # raises if the counts disagree
        assert n_tokens == n_features, size


def test_processor_without_additional_token_is_one_short(tiny_models):
    model, processor = tiny_models("llava15")
    prompt = format_prompt(processor, QUESTION)
    good = processor(text=[prompt], images=images([(64, 64)]), return_tensors="pt")
    processor.num_additional_image_tokens = 0
    try:
        short = processor(text=[prompt], images=images([(64, 64)]), return_tensors="pt")
    finally:
        processor.num_additional_image_tokens = 1
    assert image_token_mask(short["input_ids"], model).sum() == image_token_mask(good["input_ids"], model).sum() - 1


def test_mistral_prompt_ids_and_image_mask(tiny_models):
    model, processor = tiny_models("next-mistral")
    tok = mistral_tokenizer()
    prompt = format_prompt(processor, QUESTION)
    assert prompt == "[INST] <image>\nWhat is shown in this image? [/INST]"
    assert tok(prompt)["input_ids"] == PAPER_IDS
    inputs = processor(text=[prompt], images=images([(48, 80)]), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    mask = image_token_mask(inputs["input_ids"], model)[0]
    n_img = int(mask.sum())
    assert n_img > 1
    # The mask is exactly the run of expanded <image> tokens, and the rest is the paper's prompt.
    assert mask[5 : 5 + n_img].all() and mask.sum() == n_img
    assert ids[:5] + ids[5 + n_img :] == PAPER_IDS[:5] + PAPER_IDS[6:]


def test_format_prompt_uses_chat_template(tiny_models):
    _, processor = tiny_models("next-mistral")
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    try:
        assert format_prompt(processor, "Hi?") == "USER: <image>\nHi? ASSISTANT:"
        assert format_prompt(processor, "Hi?", image=False) == "USER: Hi? ASSISTANT:"
    finally:
        processor.chat_template = None


def test_load_vlm_local_dir_roundtrip(tiny_models, tmp_path):
    model, processor = tiny_models("next-qwen2")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = load_vlm(str(tmp_path))
    inputs = processor(text=[format_prompt(processor, QUESTION)], images=images([(64, 64)]), return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded_proc(text=[format_prompt(loaded_proc, QUESTION)], images=images([(64, 64)]),
                       return_tensors="pt")["input_ids"].tolist() == inputs["input_ids"].tolist()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("/no/such/dir", "no such directory"),
        ("./relative/missing", "no such directory"),
        ("no-such-org/no-such-model-xyz", "could not be loaded"),
    ],
)
def test_load_vlm_bad_model(arg, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message):
        load_vlm(arg)


def test_load_vlm_not_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_vlm(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="not a model directory"):
        load_vlm(str(tmp_path / "weights.bin"))


def test_bad_dtype():
    with pytest.raises(UserError, match="unknown dtype"):
        load_vlm("toy", dtype="float8")


@pytest.mark.parametrize("kind", ["next-mistral", "llava15"])
@pytest.mark.parametrize("features", [True, False])
def test_vlm_inputs_share_repeated_rows_and_equal_the_processor(tiny_models, kind, features, monkeypatch):
    """Rows repeating (image, prompt) pairs -- a k sweep -- are encoded once, and the model sees
    exactly the inputs the processor would give: same ids, padding and logits."""
    model, processor = tiny_models(kind)
    processor.tokenizer.padding_side = "left"
    pics = images([(40, 24), (24, 40), (32, 32)])
    prompts = [format_prompt(processor, q) for q in (QUESTION, "Describe it.")]
    rows = [(0, 0), (0, 0), (1, 1), (0, 1), (2, 0), (1, 1), (0, 0)]
    row_images, row_prompts = [pics[i] for i, _ in rows], [prompts[j] for _, j in rows]
    ref = processor(text=row_prompts, images=row_images, return_tensors="pt", padding=True)
    encoded = []
    tower = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda **kw: encoded.append(kw) or tower(**kw))
    if not features:  # a model whose forward takes pixels only
        pixels_only(model, monkeypatch)
    ours = vlm_inputs(model, processor, row_images, row_prompts)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    if features:
        assert "pixel_values" not in ours and len(encoded) == 1
        assert encoded[0]["pixel_values"].shape[0] == 3  # the 3 distinct images
    else:
        assert "mm_encoder_outputs" not in ours and not encoded
        assert ours["pixel_values"].shape[0] == len(rows)
    with torch.no_grad():
        expected = model(**ref).logits
        got = model(**ours).logits
        again = model(**ours).logits  # precomputed features serve more than one forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got)
