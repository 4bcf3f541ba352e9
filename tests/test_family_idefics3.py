"""Idefics3 (tests/family_idefics3.py, lineofsight.models.image_token_layout) against transformers' own code: the
processor's image-token counts, the tile / pixel-shuffle token order, which positions hold image features (with
mixed tile counts in a batch), save/load. Cached decoding = generate: tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from family_idefics3 import build, processor, real_settings
from PIL import Image

from lineofsight.models import image_token_layout as layout

TINY_SIZES = [(64, 64), (96, 32), (32, 96), (5, 7), (33, 17), (61, 45), (45, 61), (100, 37)]
REAL_SIZES = [(364, 364), (1000, 500), (500, 1000), (7, 5), (1200, 300), (777, 555)]


@pytest.fixture(scope="module")
def tiny():
    return build()


def _counts(proc, sizes):
    """How many <image> positions the processor writes for each image (one prompt per image)."""
    out = proc(text=[proc.image_token] * len(sizes), images=images(sizes), return_tensors="pt", padding=True)
    return (out["input_ids"] == proc.image_token_id).sum(1).tolist()


@pytest.mark.parametrize("setting", ["tiny", "no_splitting", "longest_80", "small_longest", "real"])
def test_token_count_matches_processor(tiny, setting):
    model, _ = tiny
    config, proc, sizes = model.config, None, TINY_SIZES
    if setting == "tiny":
        proc = tiny[1]
    elif setting == "no_splitting":  # every image squashed to one tile: the global grid alone
        proc = processor(image_settings={"do_image_splitting": False})
    elif setting == "longest_80":  # longest edge not a multiple of the tile: step 2 rounds it up to 96 (3 tiles)
        proc = processor(image_settings={"size": {"longest_edge": 80}})
    elif setting == "small_longest":  # longest edge 32 = one tile: never split although splitting is on
        proc = processor(image_settings={"size": {"longest_edge": 32}})
    else:
        config, proc = real_settings()
        sizes = REAL_SIZES
    assert [layout(config, proc, size).n_tokens for size in sizes] == _counts(proc, sizes)


def test_known_grids_real_settings():
    config, proc = real_settings()
    # Square: longest edge -> 1456 = 4 tiles of 364 each way, + global; 17 x 169 tokens.
    square = layout(config, proc, (500, 500))
    assert square.n_tokens == 17 * 169 and [g.name for g in square.grids] == ["crops"] * 16 + ["base"]
    assert square.grids[-1].box == (0.0, 0.0, 500.0, 500.0)
    assert square.grids[5].box == pytest.approx((125.0, 125.0, 250.0, 250.0))  # row 2, col 2
    # 1000x500: 1456 x int(1456 / 2) = 728 (even) -> 728 is 2 tiles: 2 x 4 tiles + global = 9 x 169.
    wide = layout(config, proc, (1000, 500))
    assert wide.n_tokens == 9 * 169 and len(wide.grids) == 9  # row 2, col 4 is the 8th tile
    assert wide.grids[7].box == pytest.approx((750.0, 250.0, 1000.0, 500.0))
    # 777x555: 1456 x int(1456 / (777/555)) = 1040 -> up to 1092 = 3 tiles: the tiles stretch the image vertically.
    odd = layout(config, proc, (777, 555))
    assert odd.n_tokens == 13 * 169
    assert odd.grids[5].box == pytest.approx((777 / 4, 555 / 3, 777 / 2, 2 * 555 / 3))
    for grid in odd.grids:
        assert grid.shape == (13, 13) and torch.equal(grid.tokens, grid.tokens[0] + torch.arange(169))
    assert len(odd.newlines) == 0


def _local(model):
    """Zero every vision encoder layer's attention and MLP output projections: each layer then adds nothing to its
    residual, so a patch's vision feature is its own patch embedding (+ position embedding) through the per-token
    post-layernorm, and the connector (pixel shuffle + a per-token linear map) makes each token out of its own
    s x s block of patches alone. A pixel change then reaches exactly the tokens whose patches contain it."""
    with torch.no_grad():
        for layer in model.model.vision_model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return model


def _image_rows(model, proc, image):
    """The first decoder block's input at the image's <image> positions, in order (the real path: processor ->
    get_image_features -> masked_scatter into the positions of input_ids)."""
    inputs = proc(text=[proc.image_token], images=[image], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[0][0]
    return hidden[inputs["input_ids"][0] == model.config.image_token_id]


def _overlaps(boxes, region, margin=(0.0, 0.0)):
    x0, y0, x1, y1 = region
    mx, my = margin
    return ((boxes[:, 0] < x1 + mx) & (boxes[:, 2] > x0 - mx) & (boxes[:, 1] < y1 + my) & (boxes[:, 3] > y0 - my))


def _blur_margin(width, height, proc, grid_name):
    """How far (original pixels, per axis) the image processor's Lanczos resizes can carry a pixel change: each
    resize of src -> dst px reads source pixels within 3 * max(1, src / dst) of an output pixel; an unchanged size
    is a copy (0). The tiles pass two resizes (longest edge, tile multiples), the global image a third (to one
    tile). Read off the layout's own steps."""
    from lineofsight.models import _idefics3_tiles

    tile = proc.image_processor.max_image_size["longest_edge"]
    _, _, h1, w1, h2, w2 = _idefics3_tiles(proc, width, height)
    stages_x = [(width, w1), (w1, w2)] + ([(w2, tile)] if grid_name == "base" else [])
    stages_y = [(height, h1), (h1, h2)] + ([(h2, tile)] if grid_name == "base" else [])

    def margin(stages, full):
        total = 0.0
        for src, dst in stages:
            if src != dst:
                total += 3 * max(1.0, src / dst) * full / src  # source pixels of this stage -> original pixels
        return total

    return margin(stages_x, width), margin(stages_y, height)


@pytest.mark.parametrize(("size", "regions"), [
    ((64, 64), [(0, 0, 8, 8), (20, 36, 29, 41), (56, 60, 64, 64)]),  # no resize before the tiles: exact
    ((64, 32), [(30, 10, 35, 12), (0, 24, 3, 32)]),  # 1 x 2 tiles, exact
    ((45, 61), [(10, 20, 14, 23), (40, 0, 45, 5)]),  # upscaled 48 x 64, then 64 x 64: blurred
    ((100, 37), [(50, 18, 53, 20), (0, 30, 6, 37)]),  # downscaled 64 x 24, then 64 x 32: blurred
])
def test_token_boxes_match_local_vision_tower(size, regions):
    """Perturb a region of the original image; with a local vision tower the image tokens whose features change are
    the tokens whose layout box overlaps the region: exactly, where the tiles are cut from the image as given; where
    the image processor resizes (Lanczos), at least those and at most those within the resizes' reach."""
    model, proc = build(n_layers=1)
    _local(model)
    (image,) = images([size], seed=3)
    base = _image_rows(model, proc, image)
    lay = layout(model.config, proc, size)
    boxes = lay.boxes()
    assert base.shape[0] == lay.n_tokens
    for region in regions:
        pixels = image.load()
        changed_image = image.copy()
        changed_pixels = changed_image.load()
        for x in range(region[0], region[2]):
            for y in range(region[1], region[3]):
                changed_pixels[x, y] = tuple(255 - v for v in pixels[x, y])
        changed = (_image_rows(model, proc, changed_image) != base).any(-1)
        for grid in lay.grids:
            got = changed[grid.tokens]
            must = _overlaps(boxes[grid.tokens], region)
            may = _overlaps(boxes[grid.tokens], region, _blur_margin(*size, proc, grid.name))
            assert (got >= must).all() and (got <= may).all(), (size, region, grid.name)
            if _blur_margin(*size, proc, grid.name) == (0.0, 0.0):
                assert torch.equal(got, must)
        assert changed.any()


def test_image_positions_are_image_tokens(tiny):
    """Scaling the precomputed image features changes the first decoder block's input exactly at the <image>
    positions: the markers (<fake_token_around_image>, <row_r_col_c>, <global-img>, the newlines) hold their token
    embeddings. Two images with different tile counts in one batch (zero-padded tiles) and a batch whose rows repeat
    an image (each image encoded once) give what the pixel path gives."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, proc = tiny
    ims = images([(64, 48), (32, 96)])
    out = proc(text=[f"{proc.image_token}Is the shape red?", f"What is {proc.image_token} here?"], images=ims,
               return_tensors="pt", padding=True)
    assert out["pixel_values"].shape == (2, 5, 3, 32, 32)  # 2x2 tiles + global; 2x1 + global, zero-padded
    assert out["pixel_attention_mask"].sum((2, 3)).tolist() == [[1024] * 5, [1024] * 3 + [0] * 2]
    tokens = set(proc.tokenizer.convert_ids_to_tokens(out["input_ids"][0]))
    assert {"<fake_token_around_image>", "<row_2_col_2>", "<global-img>"} <= tokens
    with torch.no_grad():
        feats = model.get_image_features(out["pixel_values"], out["pixel_attention_mask"]).pooler_output
        assert [tuple(f.shape) for f in feats] == [(80, 64), (48, 64)]  # one entry per batch row, tiles in order

        def block0(features, **kw):
            text = {"input_ids": kw.pop("input_ids", out["input_ids"]),
                    "attention_mask": kw.pop("attention_mask", out["attention_mask"])}
            mm = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            return model(**text, mm_encoder_outputs=mm, output_hidden_states=True).hidden_states[0]

        plain = block0(list(feats))
        scaled = block0([2 * f for f in feats])
        pixel_path = model(**out, output_hidden_states=True).hidden_states[0]
        assert torch.equal(plain, pixel_path)
        assert torch.equal((plain != scaled).any(-1), out["input_ids"] == model.config.image_token_id)
        # Rows (image 1, image 0, image 1): features of the two distinct images, listed per row.
        rows = [1, 0, 1]
        repeated = block0([feats[r] for r in rows], input_ids=out["input_ids"][rows],
                          attention_mask=out["attention_mask"][rows])
        assert torch.equal(repeated, pixel_path[rows])


def test_save_load_round_trip(tiny, tmp_path):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    model2 = Idefics3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert proc2.chat_template == proc.chat_template and proc2.image_seq_len == proc.image_seq_len
    text = [proc.image_token + "What is shown in this image?"]
    a, b = proc(text=text, images=images([(61, 45)]), return_tensors="pt"), proc2(
        text=text, images=images([(61, 45)]), return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_unsupported_settings_raise(tiny):
    import transformers

    model, proc = tiny
    with pytest.raises(ValueError, match="'llama' model is not supported"):
        layout(transformers.LlamaConfig(), proc, (32, 32))
    with pytest.raises(ValueError, match="image_seq_len 9"):
        layout(model.config, processor(image_seq_len=9), (32, 32))
    with pytest.raises(ValueError, match="max_image_size 48"):
        layout(model.config, processor(image_settings={"max_image_size": {"longest_edge": 48}}), (32, 32))
    with pytest.raises(ValueError, match="non-empty"):
        layout(model.config, proc, (0, 5))


def test_chat_template_prompt_and_double_bos(tiny):
    """The real template writes <|begin_of_text|> itself and the tokenizer adds BOS too: the processor's ids of the
    rendered text start with two BOS. The assistant turn is 'Assistant:' + ' ' + answer + '<end_of_utterance>\\n'."""
    _, proc = tiny
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    asked = proc.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert asked == "<|begin_of_text|>User:<image>What is shown in this image?<end_of_utterance>\nAssistant:"
    turn = proc.apply_chat_template([*user, {"role": "assistant", "content": [{"type": "text", "text": "A star."}]}],
                                    tokenize=False)
    assert turn == asked + " A star.<end_of_utterance>\n"
    ids = proc(text=[asked], images=[Image.new("RGB", (40, 30))])["input_ids"][0]
    bos = proc.tokenizer.bos_token_id
    assert ids[:2] == [bos, bos] and ids[2] != bos
