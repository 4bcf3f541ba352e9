"""LLaVA-OneVision: the tiny model and processor of tests/family_llava_onevision.py and the image-token layout
(lineofsight.models.image_token_layout), checked against transformers' own code."""

from __future__ import annotations

import types

import family_llava_onevision as family  # noqa: E402
import pytest
import torch
from conftest import images

from lineofsight.models import image_token_layout as layout

TINY_SIZES = [(32, 32), (64, 64), (100, 37), (37, 100), (100, 100), (20, 20), (5, 7), (61, 45), (45, 61), (33, 17),
              (96, 32), (70, 50)]
# Real settings: (384, 384) is one tile + base; (352, 748) and (861, 328) hit unpad's float noise (see test_regions);
# (1000, 500), (800, 600) unpad partial tiles; (1920, 1080), (2304, 2304) are downsampled (anyres_max_9).
REAL_SIZES = [(384, 384), (352, 748), (700, 500), (5, 7), (1000, 500), (800, 600), (861, 328), (672, 672),
              (1200, 300), (299, 1201), (1920, 1080), (2304, 2304), (500, 1000), (1500, 1400)]
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def tiny():
    return family.build()


@pytest.fixture(scope="module")
def real():
    return family.real_settings()


def _prompt(processor, question=QUESTION):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def _counts(processor, sizes):
    out = processor(text=[processor.image_token] * len(sizes), images=images(sizes), return_tensors="pt",
                    padding=True)
    return (out["input_ids"] == processor.image_token_id).sum(1).tolist()


def test_token_count_matches_processor(tiny, real):
    model, processor = tiny
    assert [layout(model.config, processor, s).n_tokens for s in TINY_SIZES] == _counts(processor, TINY_SIZES)
    cfg, real_processor = real
    few = [(5, 7), (384, 384), (700, 500), (861, 328)]  # the processor's pixel path is slow at real size
    assert [layout(cfg, real_processor, s).n_tokens for s in few] == _counts(real_processor, few)
    # The processor's own count without pixels (what __call__ uses, read off size instead of the pixels).
    counted = real_processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in REAL_SIZES])
    assert [layout(cfg, real_processor, s).n_tokens for s in REAL_SIZES] == counted["num_image_tokens"]
    assert layout(cfg, real_processor, (2304, 2304)).n_tokens == 729 + 81 * 82  # 6x6 tiles: 162 -> 81 a side


def _canvas_region(processor, size):
    """(left, top, new_w, new_h) of the resized image on the anyres canvas, read off the processor's pixels (a white
    image is > 0 after normalising, the zero padding is 0)."""
    from PIL import Image
    from transformers.image_processing_utils import select_best_resolution

    ip = processor.image_processor
    tiles = ip(Image.new("RGB", size, (255, 255, 255)), return_tensors="pt")["pixel_values"][0][1:, 0]
    best_h, best_w = select_best_resolution((size[1], size[0]), ip.image_grid_pinpoints)
    tile = tiles.shape[-1]
    n_rows, n_cols = best_h // tile, best_w // tile
    canvas = tiles[: n_rows * n_cols].reshape(n_rows, n_cols, tile, tile).permute(0, 2, 1, 3).reshape(best_h, best_w)
    ys, xs = torch.nonzero(canvas > 0, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1 - int(xs.min()), int(ys.max()) + 1 - int(ys.min())


def _gap_settings():
    """A tiny config whose tile (18 px) is not a multiple of the patch (4): like the real 384/14, each tile has a
    strip no patch reads. pack_image_features reads only the config, so no weights are needed."""
    import transformers

    cfg, processor = family.real_settings()
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(image_size=18, patch_size=4, vision_use_head=False),
        text_config=cfg.text_config, image_token_index=cfg.image_token_id, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[18 * r, 18 * c] for r in range(1, 7) for c in range(1, 7)],
        vision_aspect_ratio="anyres_max_9")
    processor.num_image_tokens = 16
    processor.image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 18, "width": 18}, image_grid_pinpoints=cfg.image_grid_pinpoints)
    return cfg, processor


GAP_SIZES = [(30, 40), (50, 20), (7, 5), (36, 36), (61, 45), (40, 100), (45, 31)]


@pytest.mark.parametrize(("name", "sizes"), [("gap", GAP_SIZES), ("real", [(700, 500), (1000, 500), (861, 328)])])
def test_token_order_matches_pack_image_features(real, name, sizes):
    """Features tagged with (tile, row, col) of each vision patch, packed by transformers' pack_image_features: each
    crop cell's token carries the patch whose canvas pixels, mapped back through the processor's resize (measured
    on its pixels), are the cell's box; newlines carry image_newline; base cells are the base tile's patches."""
    import transformers
    from transformers.image_processing_utils import select_best_resolution

    cfg, processor = _gap_settings() if name == "gap" else real
    owner = types.SimpleNamespace(config=cfg)
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    side = tile // patch
    newline = torch.tensor([-1.0, -2.0, -3.0])
    for width, height in sizes:
        best_h, best_w = select_best_resolution((height, width), cfg.image_grid_pinpoints)
        n_cols = best_w // tile
        n_tiles = 1 + (best_h // tile) * n_cols
        feats = torch.zeros(n_tiles, side, side, 3)
        feats[..., 0] = torch.arange(n_tiles, dtype=torch.float)[:, None, None]
        feats[..., 1] = torch.arange(side, dtype=torch.float)[None, :, None]
        feats[..., 2] = torch.arange(side, dtype=torch.float)[None, None, :]
        packed, lens = transformers.LlavaOnevisionModel.pack_image_features(
            owner, [feats.reshape(n_tiles, side * side, 3)], torch.tensor([[height, width]]), image_newline=newline,
            vision_aspect_ratio=cfg.vision_aspect_ratio)
        got = layout(cfg, processor, (width, height))
        assert got.n_tokens == int(lens[0]), (width, height)
        packed = packed[0]
        assert torch.equal(packed[got.newlines], newline.expand(len(got.newlines), 3))
        base, *crops = got.grids
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        base_tags = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
        assert torch.equal(packed[base.tokens].long(), base_tags)
        assert base.box == pytest.approx((0, 0, width * side * patch / tile, height * side * patch / tile))
        assert sorted(torch.cat([g.tokens for g in got.grids] + [got.newlines]).tolist()) == list(range(got.n_tokens))
        if _downsampled(cfg, processor, (width, height)):
            continue  # bilinear mixes the tags; test_perturbed_region_changes_its_tokens covers this packing
        left, top, new_w, new_h = _canvas_region(processor, (width, height))
        boxes = got.boxes().double()
        for grid in crops:
            tag = packed[grid.tokens].long()
            t = tag[:, 0] - 1
            x0 = (t % n_cols) * tile + tag[:, 2] * patch  # the patch's canvas pixels
            y0 = (t // n_cols) * tile + tag[:, 1] * patch
            expected = torch.stack([(x0 - left) * width / new_w, (y0 - top) * height / new_h,
                                    (x0 + patch - left) * width / new_w, (y0 + patch - top) * height / new_h], 1)
            clipped = torch.stack([expected[:, 0].clamp(0, width), expected[:, 1].clamp(0, height),
                                   expected[:, 2].clamp(0, width), expected[:, 3].clamp(0, height)], 1)
            assert torch.allclose(boxes[grid.tokens], clipped.double(), atol=1e-6), (width, height)


def test_downsampled_grid_shape(real):
    """anyres_max_9: 2304x2304 -> 6x6 tiles, 162x162 patches, ratio sqrt(162**2 / (9 * 27**2)) = 2 -> 81x81."""
    cfg, processor = real
    got = layout(cfg, processor, (2304, 2304))
    base, crops = got.grids
    assert (base.shape, crops.shape, len(got.newlines)) == ((27, 27), (81, 81), 81)
    assert got.newlines.tolist() == [729 + 82 * r + 81 for r in range(81)]
    # 1920x1080: best 1152 x 2304 (3x6 tiles, 81x162 patches), unpad rows 81 -> int(1080 * 162/1920 = 91.1)... no:
    # 1920/1080 > 162/81 is false, so columns: new width int(1920 * 81/1080) = 144, pad 9: 81x144; ratio
    # sqrt(81 * 144 / 6561) = 1.33 -> int(81 // 1.33) x int(144 // 1.33) = 60 x 108.
    assert layout(cfg, processor, (1920, 1080)).grids[1].shape == (60, 108)


def _local(model):
    """Zero the output projections of every SigLIP attention and MLP: each block then adds nothing to the
    residual, so a patch's feature (hidden_states[-1], before post_layernorm) is patch_embed(its pixels) + its
    position embedding, then the per-token projector: a function of that patch's own pixels alone. What
    pack_image_features then does (unpad, bilinear downsampling, newlines) is the map under test."""
    for layer in model.model.vision_tower.encoder.layers:
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    return model


def _features(model, processor, image):
    out = processor(text=[_prompt(processor)], images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                                         return_dict=True).pooler_output
    assert len(feats) == 1 and feats[0].shape[0] == int((out["input_ids"] == model.config.image_token_id).sum())
    return feats[0]


def _downsampled(cfg, processor, size):
    """Whether anyres_max_N resized the crop grid: fewer crop cells than with an unbounded N."""
    unbounded = cfg.__class__.from_dict(cfg.to_dict())
    unbounded.vision_aspect_ratio = "anyres_max_1000000"
    stand_in = types.SimpleNamespace(num_image_tokens=processor.num_image_tokens, vision_feature_select_strategy="full",
                                     vision_aspect_ratio=unbounded.vision_aspect_ratio,
                                     image_processor=processor.image_processor)
    return layout(cfg, processor, size).n_tokens < layout(unbounded, stand_in, size).n_tokens


@pytest.mark.parametrize("size", [(48, 32), (30, 45), (64, 64), (100, 37)])
def test_perturbed_region_changes_its_tokens(tiny, size):
    """Perturb a block of the original image: the image tokens whose features change are those whose layout box
    overlaps the block, up to the resize kernels' reach (PIL bicubic: 2 source pixels a side, times the shrink
    factor), plus one source patch on a downsampled grid (bilinear mixes the two nearest source rows/columns); every
    token whose box lies inside the block (less that reach) changes; newlines never do."""
    import copy

    import numpy as np
    from PIL import Image
    from transformers.image_processing_utils import select_best_resolution

    model, processor = tiny
    model = _local(copy.deepcopy(model))
    cfg, tile, patch = model.config, family.TILE, family.PATCH
    width, height = size
    got = layout(cfg, processor, size)
    boxes = got.boxes().double()
    best_h, best_w = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    per_canvas_px = 1 / min(best_w / width, best_h / height)  # original pixels per canvas pixel
    down = _downsampled(cfg, processor, size)
    assert down == (size in [(64, 64), (100, 37)])  # the sizes above exercise both packings
    image = images([size], seed=1)[0]
    before = _features(model, processor, image)
    rng = np.random.default_rng(0)
    n_required = 0
    regions = [(0, 0, width * 2 // 3, height * 3 // 4), (width // 2, height // 3, width - 2, height * 3 // 4),
               (width // 4, height - height // 3, width * 3 // 4, height)]
    for x0, y0, x1, y1 in regions:
        pixels = np.array(image)
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        after = _features(model, processor, Image.fromarray(pixels))
        changed = set(torch.nonzero((after - before).abs().amax(-1) > 1e-5).flatten().tolist())
        allowed, required = set(), set()
        for grid in got.grids:
            if grid.name == "base":
                reach = 2 * max(1.0, width / tile, height / tile) + 1
            else:
                reach = 2 * max(1.0, per_canvas_px) + 1 + (patch * per_canvas_px if down else 0.0)
            cells = boxes[grid.tokens]
            overlaps = ((cells[:, 0] < x1 + reach) & (cells[:, 2] > x0 - reach) & (cells[:, 1] < y1 + reach)
                        & (cells[:, 3] > y0 - reach))
            inside = ((cells[:, 0] >= x0 + reach) & (cells[:, 2] <= x1 - reach) & (cells[:, 1] >= y0 + reach)
                      & (cells[:, 3] <= y1 - reach))
            allowed |= set(grid.tokens[overlaps].tolist())
            required |= set(grid.tokens[inside].tolist())
        n_required += len(required)
        assert changed, (size, (x0, y0, x1, y1))
        assert changed <= allowed, (size, (x0, y0, x1, y1), sorted(changed - allowed))
        assert required <= changed, (size, (x0, y0, x1, y1), sorted(required - changed))
        assert not changed & set(got.newlines.tolist())
    assert n_required > 0, size


def _batch(processor, sizes, questions, seed=0):
    prompts = [_prompt(processor, q) for q in questions]
    return processor(text=prompts, images=images(sizes, seed=seed), return_tensors="pt", padding=True)


def test_save_and_load_round_trip(tiny, tmp_path):
    from lineofsight.models import load_vlm

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_vlm(str(tmp_path))  # without torchvision: no video processor
    assert type(loaded_processor).__name__ == "LlavaOnevisionProcessor"
    assert loaded_processor.chat_template == family.chat_template()
    ours = _batch(processor, [(61, 45), (33, 17)], [QUESTION, "Describe this image in detail."])
    theirs = _batch(loaded_processor, [(61, 45), (33, 17)], [QUESTION, "Describe this image in detail."])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model(**ours).logits, loaded(**theirs).logits)


def test_unsupported_settings_raise(tiny):
    model, processor = tiny
    default = model.config.__class__.from_dict(model.config.to_dict())
    default.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="strategy 'default'"):
        layout(default, processor, (32, 32))
    other = types.SimpleNamespace(num_image_tokens=15, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9", image_processor=processor.image_processor)
    with pytest.raises(ValueError, match="does not expand <image>"):
        layout(model.config, other, (32, 32))
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        layout(model.config, types.SimpleNamespace(**{**vars(other), "num_image_tokens": 16,
                                                      "vision_aspect_ratio": "anyres"}), (32, 32))
