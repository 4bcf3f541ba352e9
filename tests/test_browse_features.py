"""The feature browser's data (sae/evaluation/browse_features.py) against a brute-force reference on the toy, and its
one-line errors. The pages themselves are driven in headless Chromium in tests/test_browser_ui.py."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BROWSER_D_SAE as D_SAE
from conftest import BROWSER_LAYER as LAYER
from conftest import BROWSER_RECORDS as RECORDS
from conftest import BROWSER_TOP_N as TOP_N


def read_js(path: Path) -> dict:
    """The object a site's data script assigns (``window.X = {...};``)."""
    text = path.read_text()
    return json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))


def _bytes(b64: str) -> list[int]:
    return list(base64.b64decode(b64))


def _quantise(values: np.ndarray, top: float) -> list[int]:
    """What the page holds: the activation as stored (float16), in 1/255ths of the latent's max."""
    values = values.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(values / top * 255), 0, 255)
    return np.where(values > 0, np.maximum(q, 1), 0).astype(np.uint8).tolist()


@pytest.fixture(scope="module")
def toy():
    from lineofsight.models import load_vlm

    return load_vlm("toy")


@pytest.fixture(scope="module")
def toy_sae(toy_browser_site):
    return toy_browser_site.parent.parent / "inputs"


@pytest.fixture(scope="module")
def site(toy_browser_site):
    return toy_browser_site


def test_site_data_equal_a_brute_force_harvest(toy, toy_sae, site):
    from lineofsight.data import HeldOutRecords
    from lineofsight.harvest import TOKEN_TYPES, Harvester
    from lineofsight.models import image_token_layout
    from lineofsight.sae import SparseAutoencoder
    from lineofsight.steering import load_vectors

    model, processor = toy
    sae = SparseAutoencoder.load(toy_sae / "sae")
    cfg = HeldOutRecords()
    records = cfg.read_records()[:RECORDS]
    from PIL import Image

    images = [Image.open(cfg.root / r.image).convert("RGB") for r in records]
    batch = Harvester(model, processor, [LAYER])([r.caption for r in records], images, list(range(RECORDS)))
    with torch.no_grad():
        z = sae.encode(batch.acts[:, 0])
    types = batch.token_type.long()

    index = read_js(site / "data" / "index.js")
    fires = (z > 0).sum(0)
    live = (fires > 0).nonzero().squeeze(1).tolist()
    assert index["columns"]["id"] == live and index["dead"] == [j for j in range(D_SAE) if j not in live]
    assert 0 < len(live) <= D_SAE - 4
    col = {name: dict(zip(index["columns"]["id"], v, strict=True)) for name, v in index["columns"].items()}
    for j in live:
        assert col["freq"][j] == float(f"{float(fires[j]) / len(types):.3g}")
        assert col["max"][j] == float(f"{float(z[:, j].max()):.3g}")
        image_mass, text_mass = float(z[types == 0, j].sum()), float(z[types != 0, j].sum())
        assert col["modality"][j] == pytest.approx(image_mass / (image_mass + text_mass), rel=2e-3)
    assert len(list((site / "data" / "latents").glob("*.js"))) == len(live)
    assert sorted(int(p.stem) for p in (site / "thumbs").glob("*.jpg")) == sorted(
        {im["record"] for j in live for im in read_js(site / "data" / "latents" / f"{j}.js")["images"]})

    W_U = model.get_output_embeddings().weight.detach()
    gain = model.model.language_model.norm.weight.detach()
    vectors, _ = load_vectors(toy_sae / "vectors", LAYER)
    checked_images = checked_texts = 0
    for j in live:
        page = read_js(site / "data" / "latents" / f"{j}.js")
        top = float(z[:, j].max())
        # images: records by their max over image tokens; per grid, the quantised activation of each cell's token
        per_record = [(float(z[(types == 0) & (batch.sample == r), j].max()), r) for r in range(RECORDS)]
        want = [r for v, r in sorted(per_record, key=lambda t: -t[0]) if v > 0][:TOP_N]
        assert [im["record"] for im in page["images"]] == want
        for im in page["images"]:
            sel = (types == 0) & (batch.sample == im["record"])
            acts = z[sel, j].numpy()  # image tokens in order: their type_index
            layout = image_token_layout(model, processor, images[im["record"]].size)
            grids = page["layouts"][im["layout"]]
            assert [g["name"] for g in grids] == [g.name for g in layout.grids]
            for g, heat in zip(layout.grids, im["heat"], strict=True):
                assert _bytes(heat) == _quantise(acts[g.tokens.numpy()], top)
            checked_images += 1
        # texts: (record, caption in context | alone) sequences by their max; tokens and shading of the whole caption
        units = []
        for r in range(RECORDS):
            for code in (1, 2):
                sel = (types == code) & (batch.sample == r)
                if bool((z[sel, j] > 0).any()):
                    units.append((float(z[sel, j].max()), r, code))
        units.sort(key=lambda t: -t[0])
        assert [(t["record"], t["type"]) for t in page["texts"]] == [(r, TOKEN_TYPES[c]) for _, r, c in units[:TOP_N]]
        for t, (_, r, code) in zip(page["texts"], units, strict=False):
            sel = (types == code) & (batch.sample == r)
            ids = batch.token_id[sel].tolist()
            assert len(t["tokens"]) == len(ids) and "".join(t["tokens"]) == processor.tokenizer.decode(ids)
            assert _bytes(t["acts"]) == _quantise(z[sel, j].numpy(), top)
            assert t["peak"] == int(z[sel, j].argmax())
            checked_texts += 1
        # logit lens: the unit decoder direction times the final norm's gain, through the unembedding
        logits = (torch.nn.functional.normalize(sae.W_dec[j].detach(), dim=0) * gain) @ W_U.T
        ids = logits.topk(10).indices.tolist()
        assert [p[0] for p in page["logits"]["promoted"]] == processor.tokenizer.convert_ids_to_tokens(ids)
        cos = {name: float(torch.nn.functional.cosine_similarity(sae.W_dec[j].detach(), v, dim=0))
               for name, v in vectors.items()}
        assert {name: c for name, c in page["cosines"]["steering"]} == pytest.approx(cos, abs=1e-3)
        assert len(page["cosines"]["probes"]) == 3
    assert checked_images > 0 and checked_texts > 0
    # the other way round: each class's latents by |cosine|
    assert set(index["classes"]["steering"]) == {"circle@square", "star@ring"}
    assert set(index["classes"]["probes"]) == {"circle", "square", "star"}

    metrics = json.loads((site / "browser.json").read_text())
    assert metrics["n_live"] == len(live) and metrics["skipped"]["total"] == 0


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    return lines[-1]


def test_bad_input_is_one_line_and_missing_images_are_counted(run_in, toy_sae, tmp_path):
    from lineofsight.data import HeldOutRecords
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    script = "sae/evaluation/browse_features.py"
    SparseAutoencoder(SAEConfig(d_in=64, d_sae=16, layer=LAYER)).save(tmp_path / "narrow")
    line = _error_line(run_in(script, "--sae", str(tmp_path / "narrow"), "--out", str(tmp_path / "a")))
    assert "d_in 64" in line and "d_model 128" in line
    SparseAutoencoder(SAEConfig(d_in=128, d_sae=16, layer=99)).save(tmp_path / "deep")
    assert "layer" in _error_line(run_in(script, "--sae", str(tmp_path / "deep"), "--out", str(tmp_path / "a")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = _error_line(run_in(script, "--sae", str(toy_sae / "sae"), "--out", str(other), "--overwrite"))
    assert "not empty" in line and (other / "notes.txt").read_text() == "mine"
    assert "--sae" in _error_line(run_in(script, "--out", str(tmp_path / "a")))

    # a record whose image is missing is skipped and counted, never shown
    cfg = HeldOutRecords()
    data = json.loads(Path(cfg.data).read_text())[:3]
    data.append({**data[0], "id": "gone", "image": "sharegpt4v/does-not-exist.png"})
    shutil.copytree(cfg.root / "sharegpt4v", tmp_path / "images" / "sharegpt4v",
                    ignore=lambda d, names: [n for n in names if n not in {Path(r["image"]).name for r in data}])
    (tmp_path / "images" / "records.json").write_text(json.dumps(data))
    proc = run_in(script, "--sae", str(toy_sae / "sae"), "--data", str(tmp_path / "images" / "records.json"),
                  "--top-n", "2", "--out", str(tmp_path / "site"), "--load-threads", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "site" / "browser.json").read_text())
    assert metrics["skipped"]["counts"] == {"missing": 1} and metrics["n_records"] == 4
    shown = {im["record"] for p in (tmp_path / "site" / "data" / "latents").glob("*.js") for im in read_js(p)["images"]}
    assert 3 not in shown and shown
