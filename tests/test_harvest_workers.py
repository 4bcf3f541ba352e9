"""Preprocessing in the loader's workers: per-record processor calls, collated, give exactly the batched
processor's tensors and the same harvest."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import images

from lineofsight.data import CaptionRecord, SkipCounter
from lineofsight.harvest import (
    TOKEN_TYPES,
    Harvester,
    ImageLoader,
    PreparedRecord,
    TokenBatch,
    record_batches,
)

KINDS = ["next-mistral", "llava15"]
# Sizes that pick different LLaVA-NeXT grids (1, 2 or 4 patches + the base image), so the collate pads
# pixel_values over the patch dimension; captions of different lengths, so it pads the tokens.
SIZES = [(32, 32), (64, 30), (25, 70), (90, 90), (41, 33)]
CAPTIONS = ["a red circle.", "a small blue star on a grey background, drawn with thin lines.", "two squares",
            "a large green triangle in the middle of the picture", "dots"]


def _equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _equal_batches(a: TokenBatch, b: TokenBatch) -> None:
    _equal_dicts(a.to_dict(), b.to_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_collate_equals_the_batched_processor(tiny_models, kind):
    model, processor = tiny_models(kind)
    harvester = Harvester(model, processor, [1])
    ims = images(SIZES, seed=1)
    batched = harvester._right_padded(text=[harvester.prompt + " " + c for c in CAPTIONS], images=ims)
    collated = harvester.collate([harvester.prepare(c, im) for c, im in zip(CAPTIONS, ims)])
    _equal_dicts(batched, collated)
    if kind.startswith("next"):
        n_patches = {int(harvester.prepare(c, im).inputs["pixel_values"].shape[1]) for c, im in zip(CAPTIONS, ims)}
        assert len(n_patches) > 1  # the patch padding was exercised
    assert len(set(batched["attention_mask"].sum(1).tolist())) > 1  # and the token padding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("types,max_caption_tokens", [(TOKEN_TYPES, 128), (TOKEN_TYPES, 3), (("image",), 128),
                                                      (("text_in_context", "text_only"), 5)])
def test_prepared_harvest_equals_the_image_harvest(tiny_models, kind, types, max_caption_tokens):
    model, processor = tiny_models(kind)
    harvester = Harvester(model, processor, [0, 2], types=types, max_caption_tokens=max_caption_tokens)
    ims = images(SIZES, seed=2)
    ids = [7, 3, 11, 0, 5]
    prepared = [harvester.prepare(c, im) for c, im in zip(CAPTIONS, ims)]
    expected = harvester(CAPTIONS, ims, ids)
    assert len(expected) > 0
    _equal_batches(expected, harvester(CAPTIONS, prepared, ids))
    _equal_batches(expected, harvester.run_prepared(prepared, ids))
    # eval_sae calls prepare_with_image itself: the same inputs, kept positions and codes
    inputs, keep, codes = harvester.prepare_with_image(CAPTIONS, ims)
    inputs_p, keep_p, codes_p = harvester.prepare_with_image(CAPTIONS, prepared)
    _equal_dicts(inputs, inputs_p)
    assert torch.equal(keep, keep_p) and torch.equal(codes, codes_p)


def test_prepared_records_must_match_the_batch(tiny_models):
    model, processor = tiny_models("next-mistral")
    harvester = Harvester(model, processor, [1])
    ims = images(SIZES[:2])
    prepared = [harvester.prepare(c, im) for c, im in zip(CAPTIONS, ims)]
    with pytest.raises(ValueError, match="PreparedRecords"):
        harvester(CAPTIONS[:2], [prepared[0], ims[1]], [0, 1])
    with pytest.raises(ValueError, match="PreparedRecords"):
        harvester(CAPTIONS[1::-1], prepared, [0, 1])


def test_preparer_pixel_values_in_model_dtype_and_picklable(tiny_models):
    model, processor = tiny_models("next-mistral")
    harvester = Harvester(model.to(torch.bfloat16), processor, [1])
    try:
        im = images([(64, 30)])[0]
        got = harvester.prepare(CAPTIONS[0], im)
        assert isinstance(got, PreparedRecord) and got.inputs["pixel_values"].dtype == torch.bfloat16
        again = pickle.loads(pickle.dumps(harvester.prepare))(CAPTIONS[0], im)  # what a process pool would do
        _equal_dicts(got.inputs, again.inputs)
    finally:
        model.to(torch.float32)


def test_preparing_in_threads_while_the_main_thread_pads(tiny_models):
    """Workers tokenise while the harvester's padded calls change the main tokenizer's settings."""
    model, processor = tiny_models("next-mistral")
    harvester = Harvester(model, processor, [1])
    ims = images(SIZES * 4, seed=3)
    caps = CAPTIONS * 4
    serial = [harvester.prepare(c, im) for c, im in zip(caps, ims)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(harvester.prepare, c, im) for c, im in zip(caps, ims)]
        for _ in range(5):
            harvester.caption_only(CAPTIONS, range(len(CAPTIONS)))
        threaded = [f.result() for f in futures]
    for a, b in zip(serial, threaded):
        _equal_dicts(a.inputs, b.inputs)


def _records(tmp_path, sizes):
    for i, im in enumerate(images(sizes, seed=4)):
        im.save(tmp_path / f"{i}.jpg", quality=90)
    records = [CaptionRecord(id=str(i), image=f"{i}.jpg", question="", caption=CAPTIONS[i % len(CAPTIONS)])
               for i in range(len(sizes))]
    records.insert(3, CaptionRecord(id="gone", image="missing.jpg", question="", caption="never read"))
    return records


@pytest.mark.parametrize("threads", [0, 2])
def test_record_batches_with_prepare_give_the_same_harvest(tiny_models, tmp_path, threads):
    model, processor = tiny_models("next-mistral")
    harvester = Harvester(model, processor, [1, 2])
    records = _records(tmp_path, SIZES * 2)
    runs = []
    for prepare in (None, harvester.prepare):
        skips = SkipCounter()
        got = [harvester(captions, ims, idx)
               for idx, captions, ims in record_batches(records, range(len(records)), tmp_path, 4, skips, threads,
                                                        resize=None, prepare=prepare)]
        if prepare is not None:
            assert all(isinstance(x, PreparedRecord) for _, _, ims in
                       record_batches(records, range(len(records)), tmp_path, 4, SkipCounter(), threads,
                                      prepare=prepare) for x in ims)
        runs.append((TokenBatch.cat(got), skips))
    (plain, skips_plain), (prepped, skips_prepped) = runs
    _equal_batches(plain, prepped)
    assert skips_plain.total == 1 and skips_plain.to_dict() == skips_prepped.to_dict()


def test_image_loader_get_returns_prepared_records(tiny_models, tmp_path):
    model, processor = tiny_models("llava15")
    harvester = Harvester(model, processor, [1])
    records = _records(tmp_path, SIZES)
    loader = ImageLoader(records, tmp_path, 2, None, harvester.prepare)
    try:
        loader.want(range(len(records)))
        skips = SkipCounter()
        idx, captions, prepared = loader.batch(range(len(records)), skips)
    finally:
        loader.close()
    assert idx == [0, 1, 2, 4, 5] and skips.total == 1
    plain = ImageLoader(records, tmp_path)
    _, _, ims = plain.batch(idx, SkipCounter())
    _equal_batches(harvester(captions, ims, idx), harvester(captions, prepared, idx))
