"""Gemma 3 (tests/family_gemma3.py; the layout: lineofsight.models.image_token_layout) against transformers' own Gemma 3 code."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from family_gemma3 import MM_TOKENS, REAL_MM_TOKENS, build, real_settings

from lineofsight.models import image_token_layout as layout

SIZES = [(64, 64), (96, 40), (40, 100), (5, 7), (33, 17), (100, 37), (640, 480), (17, 33)]
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def tiny():
    return build()


def _prompt(processor, question=QUESTION):
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": question}]}],
                                         add_generation_prompt=True, tokenize=False)


def _pan_and_scan(processor, min_crop):
    """Pan and scan on for every call: Gemma3Processor.images_kwargs overrides the image processor's own
    do_pan_and_scan, so this (or the call's do_pan_and_scan=True) is the switch."""
    processor.images_kwargs = {**type(processor).images_kwargs, "do_pan_and_scan": True,
                               "pan_and_scan_min_crop_size": min_crop}


@pytest.mark.parametrize("name", ["tiny", "real", "real-pan-and-scan"])
def test_token_count_matches_processor(tiny, name):
    cfg, processor = (tiny[0].config, tiny[1]) if name == "tiny" else real_settings()
    sizes = SIZES
    if name == "real-pan-and-scan":
        _pan_and_scan(processor, 256)
        sizes = SIZES + [(1500, 600), (600, 1500), (2000, 300), (300, 700), (1100, 900)]
    prompts = [processor.image_token] * len(sizes)  # "<start_of_image>": what the chat template writes
    out = processor(text=prompts, images=[[im] for im in images(sizes)], return_tensors="pt", padding=True)
    counts = (out["input_ids"] == cfg.image_token_id).sum(1).tolist()
    assert [layout(cfg, processor, size).n_tokens for size in sizes] == counts
    if name != "real-pan-and-scan":
        assert set(counts) == {MM_TOKENS if name == "tiny" else REAL_MM_TOKENS}  # fixed, whatever the size
    else:
        assert max(counts) == 5 * REAL_MM_TOKENS  # a 2000x300 image: the image and 4 crops
    # token_type_ids mark exactly the soft tokens (not <start_of_image>/<end_of_image>)
    assert torch.equal(out["token_type_ids"] == 1, out["input_ids"] == cfg.image_token_id)


def test_placeholder_expansion(tiny):
    """<start_of_image> in the prompt becomes "\\n\\n<start_of_image>" + n soft tokens + "<end_of_image>\\n\\n"; the
    rendered template starts with "<bos>" and the tokenizer adds another one (double BOS) unless told not to."""
    model, processor = tiny
    tok = processor.tokenizer
    prompt = _prompt(processor)
    assert prompt == f"<bos><start_of_turn>user\n<start_of_image>{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    ids = processor(text=[prompt], images=[images([(40, 30)])], return_tensors="pt")["input_ids"][0].tolist()
    expected = prompt.replace("<start_of_image>", "\n\n<start_of_image>" + "<image_soft_token>" * MM_TOKENS
                              + "<end_of_image>\n\n")
    assert ids == tok(expected)["input_ids"]
    assert ids[:2] == [tok.bos_token_id] * 2  # double BOS
    assert tok(expected, add_special_tokens=False)["input_ids"] == ids[1:]
    assert processor.image_token_id == model.config.boi_token_id != model.config.image_token_id


def _local_vision(model):
    """Zero every SigLIP layer's attention and MLP output projections: each encoder layer is then the identity on
    its residual, so a patch's feature is its own patch embedding + position embedding through the final
    LayerNorm, and the projector's average pool mixes only the patches of one token's cell. A token's feature then
    depends only on the pixels of its cell, so the tokens whose features change when a region changes are exactly
    the cells that see it."""
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()


def _overlapping(boxes, region, margin=(0.0, 0.0)):
    x0, y0, x1, y1 = region
    mx, my = margin
    hit = (boxes[:, 0] < x1 + mx) & (boxes[:, 2] > x0 - mx) & (boxes[:, 1] < y1 + my) & (boxes[:, 3] > y0 - my)
    return set(torch.nonzero(hit).flatten().tolist())


@pytest.mark.parametrize("size", [(64, 64), (96, 40), (40, 100), (130, 50)])
def test_token_boxes_match_local_vision_tower(size):
    """Perturb a region of the original image; the soft tokens whose features change (the real path: processor,
    get_image_features, in the order masked_scatter fills the image positions) are those whose layout box
    overlaps it. A 64x64 image is the tile itself (no resize): exact. Otherwise the bilinear (antialiased) resize
    smears a pixel over its filter support, max(1, scale) original pixels a side, so the changed set lies between
    the cells overlapping the region shrunk by it and those overlapping the region grown by it. 130x50 runs with
    pan and scan on (min crop 32): three crops after the base grid."""
    import numpy as np
    from PIL import Image

    model, processor = build(n_layers=1)
    _local_vision(model)
    if size == (130, 50):
        _pan_and_scan(processor, 32)
    width, height = size
    lay = layout(model.config, processor, size)
    boxes = lay.boxes().double()
    base = np.asarray(images([size], seed=1)[0]).copy()
    rng = np.random.default_rng(2)

    def features(array):
        out = processor(text=[processor.image_token], images=[[Image.fromarray(array)]], return_tensors="pt")
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=out["pixel_values"]).pooler_output
        assert (out["input_ids"] == model.config.image_token_id).sum() == feats.shape[0] * feats.shape[1]
        return feats.reshape(-1, feats.shape[-1])  # rank k among the image positions gets row k

    ref = features(base)
    assert ref.shape[0] == lay.n_tokens
    scale = (max(1.0, width / 64), max(1.0, height / 64))
    regions = [(0, 0, 8, 8), (width - 12, height - 9, width, height), (width // 3, height // 2, width // 3 + 10,
                                                                          height // 2 + 6)]
    for x0, y0, x1, y1 in regions:
        changed_image = base.copy()
        changed_image[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3))
        changed = set(torch.nonzero((features(changed_image) - ref).abs().amax(-1) > 1e-5).flatten().tolist())
        if size == (64, 64):
            assert changed == _overlapping(boxes, (x0, y0, x1, y1))
        else:
            inner = (x0 + scale[0], y0 + scale[1], x1 - scale[0], y1 - scale[1])
            assert _overlapping(boxes, inner) <= changed <= _overlapping(boxes, (x0, y0, x1, y1), scale)
            assert _overlapping(boxes, inner)  # the lower bound is not empty


def test_image_positions_and_embedding_scale(tiny):
    """Scaling the image features changes the first decoder block's input exactly at input_ids ==
    image_token_id (not at <start_of_image>/<end_of_image>), where it holds the features in rank order, unscaled;
    every other position holds the token embedding times sqrt(hidden_size)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = tiny
    out = processor(text=[_prompt(processor)] * 2, images=[[im] for im in images([(64, 64), (96, 40)])],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=out["pixel_values"]).pooler_output  # [2, MM_TOKENS, 64]
    seen = []
    block = model.model.language_model.layers[0]
    hook = block.register_forward_pre_hook(lambda m, args, kw: seen.append((args[0] if args else
                                                                            kw["hidden_states"]).clone()),
                                           with_kwargs=True)
    try:
        inputs = {k: v for k, v in out.items() if k != "pixel_values"}
        with torch.no_grad():
            for s in (1.0, 2.0):
                model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats * s)})
    finally:
        hook.remove()
    image = out["input_ids"] == model.config.image_token_id
    assert torch.equal((seen[1] - seen[0]).abs().amax(-1) > 0, image)
    assert torch.equal(seen[0][image], feats.reshape(-1, feats.shape[-1]))
    emb = model.model.language_model.embed_tokens
    text = out["input_ids"][~image]
    assert torch.allclose(seen[0][~image], emb.weight[text] * model.config.text_config.hidden_size ** 0.5)


def test_final_norm_gain_is_one_plus_weight(tiny):
    model, _ = tiny
    norm = model.model.language_model.norm
    x = torch.randn(3, 64)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
    assert norm.weight.abs().min() > 0
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_save_load_round_trip(tiny, tmp_path):
    import transformers

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor2 = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(processor2) is type(processor) and processor2.chat_template == processor.chat_template
    prompt = _prompt(processor)
    assert _prompt(processor2) == prompt
    kw = dict(text=[prompt, prompt + "A"], images=[[im] for im in images([(64, 64), (96, 40)])],
              return_tensors="pt", padding=True)
    out, out2 = processor(**kw), processor2(**kw)
    assert out.keys() == out2.keys() and all(torch.equal(out[k], out2[k]) for k in out)
    with torch.no_grad():
        assert torch.equal(model(**out).logits, model2(**out2).logits)
