"""lineofsight.models.image_token_layout: which pixels each image token stands for (LLaVA-NeXT anyres, LLaVA-1.5)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import PATCH, images, mistral_tokenizer

from lineofsight.models import image_token_layout

# llava-hf/llava-v1.6-mistral-7b-hf's image settings (its config.json and preprocessor_config.json).
REAL_TILE, REAL_PATCH = 336, 14
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_SIZES = [(32, 32), (96, 32), (32, 96), (5, 7), (33, 17), (17, 33), (61, 45), (45, 61), (100, 37), (640, 480)]
# (352, 748), (861, 328): unpad's new size is 748 * (24/352) = 50.99999999999999 (63.0 less noise for the other),
# which int(round(x, 7)) makes 51: a plain int() would keep one row more; (700, 500), (5, 7): unpad keeps less than
# the image / cells reaching past it (clipped).
REAL_SIZES = [(352, 748), (700, 500), (5, 7), (1000, 500), (800, 600), (861, 328), (672, 672), (500, 1000),
              (500, 700), (1023, 769), (1200, 300), (299, 1201)]


@pytest.fixture(scope="module")
def real_next():
    """(config, processor) with the real llava-v1.6-mistral-7b image settings, built offline (no weights)."""
    import transformers

    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=REAL_TILE, patch_size=REAL_PATCH),
        text_config=transformers.MistralConfig(), image_grid_pinpoints=REAL_PINPOINTS, image_token_index=32000,
        vision_feature_select_strategy="default",
    )
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": REAL_TILE}, crop_size={"height": REAL_TILE, "width": REAL_TILE},
        image_grid_pinpoints=REAL_PINPOINTS,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=mistral_tokenizer(), patch_size=REAL_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return cfg, processor


def _setting(name, tiny_models, real_next):
    if name == "real":
        return real_next
    return tiny_models(name)


def _processor_counts(processor, sizes):
    """How many image tokens the processor puts in input_ids for each image (one <image> prompt per image)."""
    out = processor(text=[processor.image_token] * len(sizes), images=images(sizes), return_tensors="pt",
                    padding=True)
    return (out["input_ids"] == processor.image_token_id).sum(1).tolist(), out


@pytest.mark.parametrize(("name", "sizes"), [("next-mistral", TINY_SIZES), ("real", REAL_SIZES),
                                             ("llava15", TINY_SIZES)])
def test_token_count_matches_processor(tiny_models, real_next, name, sizes):
    model_or_config, processor = _setting(name, tiny_models, real_next)
    counts, _ = _processor_counts(processor, sizes)
    assert [image_token_layout(model_or_config, processor, size).n_tokens for size in sizes] == counts


def _canvas_image_region(processor, size):
    """(left, top, new_w, new_h, n_tile_cols): where the resized image lies on the anyres canvas, read off the
    processor's own pixels: a white image's pixels normalize to > 0 in the red channel, the zero padding to < 0."""
    from PIL import Image

    pixels = processor.image_processor(Image.new("RGB", size, (255, 255, 255)), return_tensors="pt")
    tiles = pixels["pixel_values"][0][1:, 0]  # crop tiles, red channel [n_tiles, tile, tile]
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((size[1], size[0]), processor.image_processor.image_grid_pinpoints)
    tile = tiles.shape[-1]
    n_rows, n_cols = best_h // tile, best_w // tile
    canvas = tiles[: n_rows * n_cols].reshape(n_rows, n_cols, tile, tile).permute(0, 2, 1, 3).reshape(best_h, best_w)
    ys, xs = torch.nonzero(canvas > 0, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1 - int(xs.min()), int(ys.max()) + 1 - int(ys.min()), n_cols


@pytest.mark.parametrize(("name", "sizes"), [("next-mistral", TINY_SIZES), ("real", REAL_SIZES[:6])])
def test_token_order_matches_pack_image_features(tiny_models, real_next, name, sizes):
    """Features whose channels are (tile, row, col) of each vision patch, packed by transformers' own
    pack_image_features: each layout cell's token carries the patch it claims, newlines carry image_newline, and
    the crop grid's box is exactly the kept patches' canvas region mapped back through the processor's resize."""
    import transformers
    from transformers.image_processing_utils import select_best_resolution

    model_or_config, processor = _setting(name, tiny_models, real_next)
    if name == "real":  # pack_image_features reads only self.config
        owner = types.SimpleNamespace(config=model_or_config)
        pack = lambda *a, **kw: transformers.LlavaNextModel.pack_image_features(owner, *a, **kw)  # noqa: E731
        newline = torch.tensor([-1.0, -2.0, -3.0])
        patch = REAL_PATCH
    else:
        pack, newline, patch = model_or_config.model.pack_image_features, model_or_config.model.image_newline, PATCH
    tile = REAL_TILE if name == "real" else model_or_config.config.vision_config.image_size
    side = tile // patch
    for width, height in sizes:
        left, top, new_w, new_h, n_tile_cols = _canvas_image_region(processor, (width, height))
        best_h, best_w = select_best_resolution((height, width), processor.image_processor.image_grid_pinpoints)
        n_tiles = 1 + (best_h // tile) * (best_w // tile)
        d = newline.shape[0]
        feats = torch.zeros(n_tiles, side, side, d)
        feats[..., 0] = torch.arange(n_tiles, dtype=torch.float)[:, None, None]
        feats[..., 1] = torch.arange(side, dtype=torch.float)[None, :, None]
        feats[..., 2] = torch.arange(side, dtype=torch.float)[None, None, :]
        with torch.no_grad():
            packed, lens = pack([feats.reshape(n_tiles, side * side, d)], torch.tensor([[height, width]]),
                                vision_feature_select_strategy="default", image_newline=newline)
        out = packed[0][:, :3].long()
        layout = image_token_layout(model_or_config, processor, (width, height))
        assert layout.n_tokens == int(lens[0]) == out.shape[0]
        base, crops = layout.grids
        assert (base.name, base.shape, crops.name) == ("base", (side, side), "crops")
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        assert torch.equal(out[base.tokens], torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3))
        assert torch.equal(packed[0][layout.newlines], newline.expand(len(layout.newlines), d).to(packed[0]))
        assert len(layout.newlines) == crops.shape[0]
        # Crop cells: (tile, row, col) -> row/col of the whole canvas grid; cell (i, j) must hold grid (r0+i, c0+j).
        got = out[crops.tokens]
        tile_i = got[:, 0] - 1
        grid_r = (tile_i // n_tile_cols) * side + got[:, 1]
        grid_c = (tile_i % n_tile_cols) * side + got[:, 2]
        i, j = torch.meshgrid(torch.arange(crops.shape[0]), torch.arange(crops.shape[1]), indexing="ij")
        r0, c0 = grid_r[0].item(), grid_c[0].item()
        assert torch.equal(grid_r, i.flatten() + r0) and torch.equal(grid_c, j.flatten() + c0)
        r1, c1 = r0 + crops.shape[0], c0 + crops.shape[1]
        expected = (min(max((c0 * patch - left) * width / new_w, 0.0), width),
                    min(max((r0 * patch - top) * height / new_h, 0.0), height),
                    min(max((c1 * patch - left) * width / new_w, 0.0), width),
                    min(max((r1 * patch - top) * height / new_h, 0.0), height))
        assert crops.box == pytest.approx(expected, abs=1e-9), (width, height)


def test_known_grids_real_settings(real_next):
    cfg, processor = real_next
    layout = image_token_layout(cfg, processor, (672, 672))
    base, crops = layout.grids
    assert (base.shape, crops.shape, len(layout.newlines)) == ((24, 24), (48, 48), 48)
    assert layout.n_tokens == 576 + 48 * 49 == 2928
    assert crops.box == (0.0, 0.0, 672.0, 672.0) and base.box == (0.0, 0.0, 672.0, 672.0)
    assert layout.newlines.tolist() == [576 + 49 * r + 48 for r in range(48)]

    # 1000x500: best resolution h336 x w672 (scale 0.672 fills it; 672x672 wastes more), aspect 2 = 48/24: no unpad.
    layout = image_token_layout(cfg, processor, (1000, 500))
    assert layout.grids[1].shape == (24, 48) and layout.n_tokens == 576 + 24 * 49
    assert layout.grids[1].box == (0.0, 0.0, 1000.0, 500.0)

    # 800x600: best 672x672 (scale 0.84: 672x504 effective). Canvas 48x48 patches; unpad (int(round(x, 7)): x
    # truncated, float noise aside): 800/600 > 1, new height 600 * 48/800 = 36, pad (48-36)//2 = 6: rows 6..42, 36x48. The image sits at canvas y 84..588
    # (new_h = ceil(600*0.84) = 504, top = (672-504)//2 = 84), rows 6..42 are canvas y 84..588: the whole image.
    layout = image_token_layout(cfg, processor, (800, 600))
    assert layout.grids[1].shape == (36, 48) and layout.n_tokens == 576 + 36 * 49
    assert layout.grids[1].box == pytest.approx((0.0, 0.0, 800.0, 600.0))

    # 700x500: best 672x672 (scale 0.96: 672x480). Unpad: int(500 * 48/700 = 34.29) = 34, pad (48-34)//2 = 7:
    # rows 7..41 (34x48). Image at canvas y 96..576 (top = (672-480)//2); rows 7..41 are canvas y 98..574, i.e.
    # original y (98-96)*500/480 = 2.0833 .. (574-96)*500/480 = 497.9167: unpad drops a sliver of the image.
    layout = image_token_layout(cfg, processor, (700, 500))
    assert layout.grids[1].shape == (34, 48) and layout.n_tokens == 576 + 34 * 49
    assert layout.grids[1].box == pytest.approx((0.0, 2 * 500 / 480, 700.0, 478 * 500 / 480))

    # 5x7 (tiny): all resolutions keep all 35 pixels; least waste first: h336 x w672. Unpad columns:
    # int(5 * 24/7 = 17.14) = 17, pad (48-17)//2 = 15: cols 15..33 (18 > 17 kept: the odd one stays).
    # Canvas: new_w = ceil(5 * 48) = 240, left = (672-240)//2 = 216; cols 15..33 = x 210..462 -> original
    # (210-216)*5/240 = -0.125 .. (462-216)*5/240 = 5.125, clipped to 0..5.
    layout = image_token_layout(cfg, processor, (5, 7))
    assert layout.grids[1].shape == (24, 18) and layout.grids[1].box == (0.0, 0.0, 5.0, 7.0)


def test_llava15_one_base_grid(tiny_models):
    model, processor = tiny_models("llava15")
    sizes = [(100, 50), (50, 100), (33, 17), (47, 29)]
    counts, _ = _processor_counts(processor, sizes)
    for (width, height), count, box in zip(
        sizes, counts,
        # shortest edge -> 32, long edge int(32 * long/short), centre crop 32 at floor((long-32)/2):
        # 100x50 -> 64x32, left 16: x 16..48 of 64 = 25..75; 33x17 -> 62x32, left 15: x 15*33/62 .. 47*33/62;
        # 47x29 -> int(51.86) = 51 (not 52) x 32, left 9: x 9*47/51 .. 41*47/51.
        [(25.0, 0.0, 75.0, 50.0), (0.0, 25.0, 50.0, 75.0), (15 * 33 / 62, 0.0, 47 * 33 / 62, 17.0),
         (9 * 47 / 51, 0.0, 41 * 47 / 51, 29.0)],
    ):
        layout = image_token_layout(model, processor, (width, height))
        (base,) = layout.grids
        side = 32 // PATCH
        assert layout.n_tokens == count == side * side and len(layout.newlines) == 0
        assert base.name == "base" and base.shape == (side, side) and torch.equal(base.tokens, torch.arange(count))
        assert base.box == pytest.approx(box)


@pytest.mark.parametrize("name", ["next-mistral", "real"])
def test_boxes_inside_image_and_base_tiles_it(tiny_models, real_next, name):
    model_or_config, processor = _setting(name, tiny_models, real_next)
    for width, height in TINY_SIZES + REAL_SIZES:
        layout = image_token_layout(model_or_config, processor, (width, height))
        boxes = layout.boxes()
        assert boxes.shape == (layout.n_tokens, 4) and boxes.dtype == torch.float32
        boxes = boxes.double()
        is_newline = torch.zeros(layout.n_tokens, dtype=torch.bool)
        is_newline[layout.newlines] = True
        assert boxes[is_newline].isnan().all() and not boxes[~is_newline].isnan().any()
        real = boxes[~is_newline]
        assert (real[:, 0] >= 0).all() and (real[:, 1] >= 0).all()
        assert (real[:, 2] <= width).all() and (real[:, 3] <= height).all()
        assert (real[:, 2] > real[:, 0]).all() and (real[:, 3] > real[:, 1]).all()
        base, crops = layout.grids
        assert sorted(torch.cat([base.tokens, crops.tokens, layout.newlines]).tolist()) == list(range(layout.n_tokens))
        for grid in (base, crops):
            cells = boxes[grid.tokens]
            x0, y0, x1, y1 = grid.box
            area = ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])).sum().item()
            assert area == pytest.approx((x1 - x0) * (y1 - y0), rel=1e-5)
            assert cells[:, 0].min().item() == pytest.approx(x0) and cells[:, 2].max().item() == pytest.approx(x1)
        assert base.box == (0.0, 0.0, float(width), float(height))  # the base cells tile the whole image


def test_unsupported_settings_raise(tiny_models):
    import transformers
    from torch import nn

    model, processor = tiny_models("next-mistral")
    full = model.config.__class__.from_dict(model.config.to_dict())
    full.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        image_token_layout(full, processor, (32, 32))
    with pytest.raises(ValueError, match="'mistral' model"):
        image_token_layout(transformers.MistralConfig(), processor, (32, 32))
    bare = nn.Module()
    bare.config = model.config
    with pytest.raises(ValueError, match="no image_newline"):
        image_token_layout(bare, processor, (32, 32))
    short = types.SimpleNamespace(patch_size=PATCH, num_additional_image_tokens=0, vision_feature_select_strategy="default",
                                  image_processor=processor.image_processor)
    with pytest.raises(ValueError, match="does not expand <image>"):
        image_token_layout(model, short, (32, 32))
