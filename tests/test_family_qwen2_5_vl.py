"""Qwen2.5-VL: the tiny model and processor of family_qwen2_5_vl, and the image token layout
(lineofsight.models.image_token_layout), checked against transformers' own Qwen2.5-VL code."""

from __future__ import annotations

import family_qwen2_5_vl as family
import pytest
import torch
from conftest import images

from lineofsight.models import image_token_layout as layout

# (width, height): 64x96 and 96x56 are multiples of 8 inside the pixel range (smart_resize keeps them: no
# resampling); 64x96 is 12 rows x 8 cols of merged cells = 3x2 vision windows of 4x4 cells, reordered by the tower.
# 100x100: area over max_pixels, shrunk to 72x72; 37x50 -> 40x48; 5x7 and 3x90: below min_pixels, grown; 300x20: thin.
SIZES = [(64, 96), (96, 56), (100, 100), (37, 50), (5, 7), (3, 90), (300, 20), (33, 17), (61, 45)]
# At the 7B's settings: 28 px per token, 3136 .. 12845056 pixels (4 .. 16384 tokens).
# (Images over max_pixels, >= 3584x3584, take seconds to preprocess at this size: test_known_real_sizes has one.)
REAL_SIZES = [(640, 480), (1000, 500), (5, 7), (336, 336), (1023, 769), (300, 1200), (3, 90), (1500, 700)]


@pytest.fixture(scope="module")
def tiny():
    return family.build()


@pytest.fixture(scope="module")
def real():
    return family.real_settings()


def _prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _process(processor, sizes, seed=0):
    prompt = _prompt(processor)
    return processor(text=[prompt] * len(sizes), images=images(sizes, seed), return_tensors="pt", padding=True)


@pytest.mark.parametrize(("name", "sizes"), [("tiny", SIZES), ("real", REAL_SIZES)])
def test_token_count_matches_processor(tiny, real, name, sizes):
    config_or_model, processor = tiny if name == "tiny" else real
    out = _process(processor, sizes)
    counts = (out["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert [layout(config_or_model, processor, size).n_tokens for size in sizes] == counts
    cfg = getattr(config_or_model, "config", config_or_model)
    if name == "tiny":  # real_settings has the real ids in its config and the tiny tokenizer
        assert processor.image_token_id == cfg.image_token_id


def test_known_real_sizes(real):
    cfg, processor = real
    # 640x480 -> smart_resize (factor 28): round(480/28)=17 -> 476, round(640/28)=23 -> 644: 17x23 tokens.
    grid = layout(cfg, processor, (640, 480)).grids[0]
    assert grid.shape == (17, 23) and grid.box == (0.0, 0.0, 640.0, 480.0)
    # 8000x8000 = 64e6 px > max_pixels 12845056: beta = sqrt(64e6 / 12845056); floor(8000 / beta / 28) = 128.
    assert layout(cfg, processor, (8000, 8000)).grids[0].shape == (128, 128)
    # 5x7: grown to min_pixels 3136: beta = sqrt(3136/35); ceil(7 * beta / 28) = 3, ceil(5 * beta / 28) = 2.
    assert layout(cfg, processor, (5, 7)).grids[0].shape == (3, 2)
    with pytest.raises(ValueError, match="aspect ratio"):
        layout(cfg, processor, (1000, 4))


def _local_vision(model):
    """Zero the output projections (weights and biases) of every vision block's attention and MLP: each block then
    adds nothing, the residual stream of each patch stays its own patch embedding, and the merger's output for a
    2x2 cell depends on that cell's 4 patches only. A token's feature then changes exactly when pixels of its own
    cell change, so the tokens that change when a region changes show which cells each token position holds
    (window reordering included: the tower undoes it after the merger, or the wrong positions would change)."""
    with torch.no_grad():
        for block in model.model.visual.blocks:
            for linear in (block.attn.proj, block.mlp.down_proj):
                linear.weight.zero_()
                linear.bias.zero_()


@pytest.fixture(scope="module")
def local_model():
    model, processor = family.build(seed=1)
    _local_vision(model)
    return model, processor


def _features(model, processor, image):
    out = processor(text=[_prompt(processor)], images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(out["pixel_values"], out["image_grid_thw"]).pooler_output
    assert len(feats) == 1 and feats[0].shape[0] == int((out["input_ids"] == model.config.image_token_id).sum())
    return feats[0]


@pytest.mark.parametrize("size", [(64, 96), (96, 56), (100, 100), (37, 50)])
def test_token_boxes_match_changed_features(local_model, size):
    """Repaint a region of the original image; the tokens whose features change must be the tokens whose layout box
    overlaps it. 64x96 and 96x56 are not resampled (smart_resize keeps them), so the sets are equal; the others are
    resampled (PIL bicubic mixes a few neighbouring pixels), so the changed set must contain the overlapped one and
    stay within one cell of it."""
    import numpy as np
    from PIL import Image

    model, processor = local_model
    width, height = size
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ref = _features(model, processor, Image.fromarray(base))
    lay = layout(model, processor, size)
    rows, cols = lay.grids[0].shape
    boxes = lay.boxes().double()
    exact = size in [(64, 96), (96, 56)]
    regions = [(0, 0, 5, 5), (width - 9, height // 2, width - 1, height // 2 + 3), (width // 3, 0, width // 3 + 2,
                                                                                       height)]
    for x0, y0, x1, y1 in regions:
        edited = base.copy()
        edited[y0:y1, x0:x1] = 255 - edited[y0:y1, x0:x1]
        changed = (_features(model, processor, Image.fromarray(edited)) - ref).abs().amax(-1) > 1e-6
        overlaps = (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
        if exact:
            assert torch.equal(changed, overlaps), (size, (x0, y0, x1, y1))
        else:
            assert bool((changed | ~overlaps).all()), (size, (x0, y0, x1, y1))
            grid = overlaps.view(1, 1, rows, cols).float()
            near = torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1).flatten().bool()
            assert bool((~changed | near).all()), (size, (x0, y0, x1, y1))


def test_window_reordering_happens(tiny):
    """The tiny tower's windows are smaller than a 64x96 image, so its patch order is not raster order: the test
    above would fail if the layout followed the tower's internal order."""
    from transformers.vision_utils import get_vision_window_index

    model, _ = tiny
    vision = model.config.vision_config
    index, cu = get_vision_window_index(torch.tensor([[1, 96 // 4, 64 // 4]]), vision.spatial_merge_size,
                                        vision.window_size, vision.patch_size)
    assert len(cu) - 1 == 6 and not torch.equal(index, torch.arange(len(index)))


def test_image_positions_are_image_token_ids(tiny):
    """Scale the image features; the positions of the first decoder block's input that change are exactly
    input_ids == image_token_id (not <|vision_start|>/<|vision_end|>), and the k-th such position of a row holds
    that row's image's k-th feature."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from lineofsight.hooks import Trace
    from lineofsight.models import layer_names

    model, processor = tiny
    out = _process(processor, [(64, 96), (37, 50)])
    with torch.no_grad():
        feats = model.get_image_features(out["pixel_values"], out["image_grid_thw"]).pooler_output
    inputs = {k: v for k, v in out.items() if k != "pixel_values"}

    def block0_input(features):
        model.model.rope_deltas = None
        with Trace(model, layer_names(model)[0], retain_input=True) as trace, torch.no_grad():
            model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)})
        return trace.input

    ref = block0_input(list(feats))
    scaled = block0_input([f * 3.0 + 1.0 for f in feats])
    changed = (scaled - ref).abs().amax(-1) > 0
    assert torch.equal(changed, out["input_ids"] == model.config.image_token_id)
    for row in range(2):
        assert torch.equal(ref[row][out["input_ids"][row] == model.config.image_token_id], feats[row])
    with torch.no_grad():
        model.model.rope_deltas = None
        direct = model(**out).logits
        model.model.rope_deltas = None
        via = model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(feats))})
    assert torch.allclose(direct, via.logits, atol=1e-5)


def test_save_load_round_trip(tiny, tmp_path):
    """save_pretrained + lineofsight.models.load_vlm give the same processor outputs and logits (without torchvision
    load_vlm builds the processor without its video processor; with it, AutoProcessor's)."""
    from lineofsight.models import load_vlm

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, processor2 = load_vlm(str(tmp_path))
    assert type(processor2).__name__ == "Qwen2_5_VLProcessor" and processor2.chat_template == family.chat_template()
    sizes = [(64, 96), (37, 50)]
    a, b = _process(processor, sizes), _process(processor2, sizes)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "pixel_values")
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=2 / 255 / 0.26, rtol=0)
    if torch.equal(a["pixel_values"], b["pixel_values"]):
        with torch.no_grad():
            model.model.rope_deltas = model2.model.rope_deltas = None
            assert torch.equal(model(**a).logits, model2(**b).logits)


def test_tokenizer_special_tokens(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    for token in family.SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    cfg = model.config
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert cfg.text_config.vocab_size == len(tok) and cfg.text_config.eos_token_id == tok.eos_token_id
    assert [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id] == tok.convert_tokens_to_ids(
        ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    # No BOS: the tokenizer adds nothing, the template starts with <|im_start|>.
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
