"""A feature browser for one SAE: every live latent's top images with per-patch heatmaps and its top text
contexts, as a static site that opens from ``file://`` (no server) or from ``python -m http.server``.

One streaming pass over held-out captioned images (the harvester's two passes: image + caption, caption alone;
:class:`lineofsight.features.FeatureStats`) keeps per latent: firing frequency overall and per token type,
activation mass (the modality score), max and mean activation, an activation histogram per token type, and the
``--top-n`` images and text sequences where it fires most, each with the latent's activation at every token of
that image or caption (sparse). Memory is O(d_sae x top_n); nothing else of the activations is kept. The SAE
encodes in the model's ``--dtype`` (bfloat16 for the 7B: what a GPU runs, and 4.8x faster matmuls than float32
on a CPU with bfloat16 units); the statistics are kept in float32.

Then, per live latent: its decoder direction through the unembedding (final-norm gain folded in: the logit lens)
gives the vocabulary tokens it promotes and suppresses; with ``--vectors`` / ``--probes`` its cosine with each
steering vector and each probe class direction (weight / std) of the SAE's layer, and, the other way round, each
class's closest latents (so the index finds a class's latents by the class's name).

The site (``--out``)::

    index.html, latent.html?id=N, assets/     the pages (sae/evaluation/browser/, copied as is)
    data/index.js                              the table of live latents, dead and dense latents, classes
    data/latents/<id>.js                       one latent's page data
    thumbs/<record>.jpg                        one thumbnail per shown image, shared between latents
    browser.json, run.json                     sizes, timings, counts, what was skipped

Data are script files (``window.LOS_INDEX = {...}``), not fetched JSON, so Chromium's file-URL rules do not block
them. The index holds ``meta`` (model, layer, token counts, thresholds), ``columns`` (parallel lists over live latents:
``id``, ``freq``, ``freq_<type>``, ``max``, ``mean``, ``modality``, ``top_tokens`` as indices into ``vocab``),
``dead``, ``dense`` and ``classes`` (``{"steering"|"probes": {name: [[latent, cosine], ...]}}``). A latent's file
holds ``stats``; ``images`` (``record``, ``thumb``, ``value``, ``caption``, ``layout``: an index into the page's
``layouts``, each a list of grids ``{name, box: [x0, y0, x1, y1] as fractions of the image, shape: [rows, cols]}``,
and ``heat``: per grid, base64 of ``rows x cols`` bytes, activation / the latent's max x 255, row-major);
``texts`` (``record``, ``type``, ``value``, ``peak``, ``tokens``: each token's text, ``acts``: bytes as above);
``histogram`` (``edges``, ``counts`` per token type), ``logits`` (``promoted``, ``suppressed``: ``[token, logit]``)
and ``cosines`` (``steering``, ``probes``: ``[name, cosine]``). An image's heatmap is drawn in the page from per-cell bytes over each of its token grids (LLaVA-NeXT: the
base tile and the unpadded crop grid; :func:`lineofsight.models.image_token_layout`).

    python sae/evaluation/browse_features.py --sae runs/demo/sae/saes/L2 --out results/browser   # toy
    python sae/evaluation/browse_features.py --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 \\
        --sae saes/L8 --data sharegpt4v.json --image-root images --resize 336 --offset 280000 --limit 20000 \\
        --probes runs/probes --vectors runs/vectors --out runs/browser-L8
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from lineofsight.data import HeldOutRecords
from lineofsight.features import IMAGE_ONLY, TEXT_ONLY
from lineofsight.run import Run, lifecycle

OUTPUTS = ("index.html", "latent.html", "assets", "data", "thumbs", "browser.json")
"""What the script writes into --out (what --overwrite removes)."""
SITE_DIR = Path(__file__).resolve().parent / "browser"
"""The pages and assets, copied into every site as they are."""
TOP_TOKENS = 3
"""Top text tokens per latent shown in the index."""
PAGE_COSINES = 20
"""Steering vectors / probe classes listed on a latent's page (highest |cosine| first)."""
WRITES_PENDING = 256
"""Files built and not yet written, at most."""
CAPTION_CHARS = 160
"""Caption characters shown under an image."""
CLASS_LATENTS = 10
"""Latents listed per steering vector / probe class in the index."""


@dataclasses.dataclass
class Config(HeldOutRecords):
    """Options for the feature browser."""

    sae: Path | None = None
    """The SAE folder (or a trainer run holding one SAE) to browse; it must be for --model."""
    top_n: int = 12
    """Top images and top text contexts kept per latent."""
    vectors: Path | None = None
    """Steering vectors (steering/compute_steering_vectors.py) with a vector at the SAE's layer: cosines per latent."""
    probes: Path | None = None
    """Probes (probes/train_probe.py) with a probe at the SAE's layer: cosines with each class direction."""
    image_only: float = IMAGE_ONLY
    """The index's image-only filter: modality score >= this."""
    text_only: float = TEXT_ONLY
    """The index's text-only filter: modality score <= this."""
    dense: float = 0.1
    """A latent firing on more than this share of all tokens is listed as dense."""
    n_logits: int = 10
    """Promoted and suppressed vocabulary tokens per latent."""
    thumb_size: int = 224
    """Longest side of the thumbnails, px."""
    title: str | None = None
    """Page title (default: the SAE's layer and width)."""
    out: Path = Path("runs/browser")
    """Output folder for the site (refused when it holds anything else, unless it is an earlier site and
    --overwrite is given)."""
    overwrite: bool = False
    """Replace the site already in --out (other files there are kept)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        super().__post_init__()
        if self.sae is None:
            raise UserError("--sae is required: the SAE folder to browse")
        if self.top_n < 1 or self.n_logits < 1:
            raise UserError("--top-n and --n-logits must be positive")
        if not 0 <= self.text_only < self.image_only <= 1:
            raise UserError("need 0 <= --text-only < --image-only <= 1")
        if not 0 < self.dense <= 1:
            raise UserError(f"--dense must be in (0, 1], got {self.dense}")
        if not 16 <= self.thumb_size <= 1024:
            raise UserError(f"--thumb-size must be between 16 and 1024 px, got {self.thumb_size}")


def _round(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def _grids_json(layout: Any, size: tuple[int, int]) -> list[dict[str, Any]]:
    """An image's token grids for the page: name, box as fractions of the image (x0, y0, x1, y1), shape."""
    w, h = size

    def frac(v: float, total: int) -> float | int:
        f = _round(v / total, 4)
        return int(f) if f == int(f) else f

    return [{"name": g.name, "box": [frac(g.box[0], w), frac(g.box[1], h), frac(g.box[2], w), frac(g.box[3], h)],
             "shape": list(g.shape)} for g in layout.grids]


def token_texts(tok: Any, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text (its leading space included), so the tokens joined read as the
    caption whatever the tokenizer marks spaces with."""
    out, before = [], ""
    for i in range(len(ids)):
        text = tok.decode(ids[: i + 1])
        out.append(text[len(before) :] if text.startswith(before) else tok.decode(ids[i : i + 1]))
        before = text
    return out


def js_data(var: str, obj: Any) -> str:
    """A script file assigning ``obj`` (JSON) to ``window.<var>``: what the pages load."""
    return f"window.{var} = " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + ";\n"


def _b64(a: Any) -> str:
    import base64

    return base64.b64encode(a.tobytes()).decode()


def _quantise(values: Any, top: float) -> Any:
    """Activations as bytes 0..255 of ``top`` (a nonzero activation never rounds to 0)."""
    import numpy as np

    q = np.clip(np.rint(values / max(top, 1e-30) * 255), 0, 255)
    return np.where(values > 0, np.maximum(q, 1), 0).astype(np.uint8)


def class_directions(cfg: Config, layer: int, d_model: int) -> dict[str, dict[str, Any]]:
    """``{"steering": {"src@tgt": v}, "probes": {class: w / std}}`` at ``layer`` (empty without the flags)."""
    from lineofsight.cli import UserError
    from lineofsight.probes import load_probe
    from lineofsight.steering import load_vectors

    out: dict[str, dict[str, Any]] = {"steering": {}, "probes": {}}
    if cfg.vectors is not None:
        out["steering"], _ = load_vectors(cfg.vectors, layer)
    if cfg.probes is not None:
        probe, info = load_probe(cfg.probes, layer)
        directions = probe["weight"].float() / probe["std"].float().clamp(min=1e-12)
        out["probes"] = dict(zip(info["class_names"], directions, strict=True))
    for kind, vectors in out.items():
        for name, v in vectors.items():
            if v.shape[-1] != d_model:
                raise UserError(f"--{'vectors' if kind == 'steering' else 'probes'}: {name} has width {v.shape[-1]}, "
                                f"the SAE reads width {d_model}")
    return out


def logit_lens(model: Any, W_dec: Any, n: int, chunk: int = 1024) -> tuple[Any, Any, Any, Any]:
    """Top-``n`` promoted and suppressed vocabulary ids (and logits) of each unit decoder direction ``W_dec
    [L, D]`` read through the final norm's gain and the unembedding: ``(up_vals, up_ids, down_vals, down_ids)``."""
    import torch

    from lineofsight.models import final_norm_gain

    W_U = model.get_output_embeddings().weight.detach()  # [V, D], in the model's dtype
    gain = final_norm_gain(model)
    dirs = torch.nn.functional.normalize(W_dec.detach().float(), dim=1).to(W_U.device)
    if gain is not None:
        dirs = dirs * gain.float()
    dirs = dirs.to(W_U.dtype)
    k = min(n, W_U.shape[0])
    parts = []
    for lo in range(0, dirs.shape[0], chunk):
        logits = (dirs[lo : lo + chunk] @ W_U.T).float().cpu()
        up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((up.values, up.indices, down.values, down.indices))
    if not parts:
        empty = torch.zeros(0, k)
        return empty, empty.long(), empty, empty.long()
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def cosines(W_dec: Any, directions: dict[str, Any]) -> tuple[list[str], Any]:
    """(names, cosine ``[L, n_names]``) of each decoder row with each named direction."""
    import torch

    names = list(directions)
    if not names:
        return names, torch.zeros(W_dec.shape[0], 0)
    V = torch.nn.functional.normalize(torch.stack([directions[k].float() for k in names]), dim=1)
    return names, torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1) @ V.T


def strongest(c: Any, n: int, dim: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per row (``dim=1``) or column (``dim=0``) of the cosines ``c``: the indices of its ``n`` largest ``|c|``,
    largest first, and those cosines."""
    idx = c.abs().topk(min(n, c.shape[dim]), dim=dim).indices
    values = c.gather(dim, idx)
    if dim == 0:
        idx, values = idx.T, values.T
    return idx.tolist(), values.tolist()


def _thumbnail(image: Any, size: int) -> bytes:
    import io

    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@lifecycle("sae/evaluation/browse_features.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    import numpy as np
    from tqdm import tqdm

    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter, check_resize_match, load_image
    from lineofsight.features import FeatureStats, category_masks
    from lineofsight.harvest import TOKEN_TYPES, Harvester, record_batches
    from lineofsight.io import atomic_write_bytes, atomic_write_text
    from lineofsight.models import check_model, image_token_layout
    from lineofsight.sae import check_sae_fits, load_sae
    from lineofsight.toy import ensure_toy_world

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    skips = SkipCounter()
    records = cfg.read_records(skips)
    sae = load_sae(cfg.sae, run.device)
    check_resize_match(cfg.resize, sae.cfg.resize, f"the SAE {cfg.sae}", cfg.allow_resize_mismatch)
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    layer = check_sae_fits(sae, model, model_source, None)
    sae = sae.to(next(model.parameters()).dtype)  # encode in the model's dtype (--dtype), as its residuals come
    directions = class_directions(cfg, layer, sae.cfg.d_in)
    try:  # the heatmaps need the model's image-token -> pixel map; settings it does not know fail here, not at the end
        image_token_layout(model, processor, (64, 48))
    except ValueError as err:
        raise UserError(f"--model: no image-token map for the heatmaps: {err}") from None
    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens)
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)
    out = run.out
    timings["load"] = time.perf_counter() - t0

    # ---- one streaming pass ----------------------------------------------------------------------
    t0 = time.perf_counter()
    stats = FeatureStats(sae.cfg.d_sae, cfg.top_n)
    n_batches = -(-len(records) // cfg.batch_size)
    batches = record_batches(records, range(len(records)), cfg.root, cfg.batch_size, skips, cfg.load_threads,
                             resize=cfg.resize, prepare=harvester.prepare)
    for idx, captions, images in tqdm(batches, total=n_batches, desc="harvest", disable=not run.is_main):
        run.check_alive()
        if not idx:
            continue
        batch = harvester(captions, images, idx)
        stats.add(sae, batch.acts[:, 0].to(run.device), batch)
    if int(stats.tokens.sum()) == 0:
        raise UserError(f"no tokens harvested ({skips.summary()})")
    timings["harvest_encode"] = time.perf_counter() - t0

    # ---- per-latent summaries ---------------------------------------------------------------------
    t0 = time.perf_counter()
    live = stats.live()
    ids = live.nonzero().squeeze(1)
    freq = stats.frequency()
    mean = stats.mean_when_firing()
    modality = stats.modality()
    W_dec = sae.W_dec[ids]
    up_v, up_i, down_v, down_i = logit_lens(model, W_dec, cfg.n_logits)
    cos = {kind: cosines(W_dec, vectors) for kind, vectors in directions.items()}
    page_cos = {kind: (names, *strongest(c, PAGE_COSINES, 1)) for kind, (names, c) in cos.items()}
    timings["logit_lens_cosines"] = time.perf_counter() - t0

    # ---- the site ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok = processor.tokenizer
    for path in sorted(SITE_DIR.rglob("*")):
        if path.is_file():
            atomic_write_bytes(out / path.relative_to(SITE_DIR), path.read_bytes())
    (out / "data" / "latents").mkdir(parents=True, exist_ok=True)
    (out / "thumbs").mkdir(exist_ok=True)

    # Page and thumbnail files are written (each fsynced, then renamed) by a few threads while the next pages are
    # built; at most WRITES_PENDING files wait.
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    writer, pending = ThreadPoolExecutor(4, thread_name_prefix="site"), deque()

    def write(path: Path, data: bytes) -> None:
        while len(pending) >= WRITES_PENDING:
            pending.popleft().result()
        pending.append(writer.submit(atomic_write_bytes, path, data))

    # record -> (file, bytes, (layout, its grids for the page, each grid's token indices)); None: unreadable now
    thumbs: dict[int, tuple[str, int, tuple[Any, list[dict[str, Any]], list[Any]]] | None] = {}
    layouts: dict[tuple[int, int], Any] = {}

    def thumb(record: int) -> tuple[str, int, tuple[Any, list[dict[str, Any]], list[Any]]] | None:
        if record not in thumbs:
            image = load_image(Path(cfg.root) / records[record].image, resize=cfg.resize)  # as harvested
            if image is None:  # gone since the pass: shown without it
                skips.add("unreadable at thumbnail time", records[record].image)
                thumbs[record] = None
                return None
            if image.size not in layouts:
                layout = image_token_layout(model, processor, image.size)
                layouts[image.size] = (layout, _grids_json(layout, image.size),
                                       [g.tokens.numpy() for g in layout.grids])
            data = _thumbnail(image, cfg.thumb_size)
            write(out / "thumbs" / f"{record}.jpg", data)
            thumbs[record] = (f"thumbs/{record}.jpg", len(data), layouts[image.size])
        return thumbs[record]

    caption_ids: dict[int, dict[str, tuple[list[int], list[str]]]] = {}

    def caption_tokens(record: int) -> dict[str, tuple[list[int], list[str]]]:
        if record not in caption_ids:
            caption_ids[record] = {kind: (ids, token_texts(tok, ids)) for kind, ids in
                                   harvester.caption_token_ids(records[record].caption).items()}
        return caption_ids[record]

    edges = [_round(float(e)) for e in stats.edges]
    maxima, hists = stats.max.tolist(), stats.hist.numpy()
    columns: dict[str, list[Any]] = {  # per live latent, in the order of ids: the index's table and the pages' stats
        "id": ids.tolist(),
        "freq": [_round(v) for v in freq["all"][ids].tolist()],
        **{f"freq_{t}": [_round(v) for v in freq[t][ids].tolist()] for t in TOKEN_TYPES},
        "max": [_round(v) for v in stats.max[ids].tolist()],
        "mean": [_round(v) for v in mean[ids].tolist()],
        "modality": [_round(v) for v in modality[ids].tolist()],
    }
    latent_code = sum(p.stat().st_size for p in SITE_DIR.rglob("*") if p.is_file() and p.name != "index.html")
    page_sizes = []
    top_tokens: list[list[int]] = []
    vocab: dict[str, int] = {}
    for row, latent in enumerate(tqdm(ids.tolist(), desc="pages", disable=not run.is_main)):
        top = maxima[latent]
        images_out, shown, page_layouts = [], set(), []
        for unit in stats.images.units(latent):
            found = thumb(unit.key)
            if found is None:
                continue
            file, _, (layout, grids, cells) = found
            if len(unit.positions) and int(unit.positions.max()) >= layout.n_tokens:
                raise RuntimeError(f"record {unit.key}: image-token {int(unit.positions.max())} beyond the layout's "
                                   f"{layout.n_tokens} tokens")
            dense = np.zeros(layout.n_tokens, dtype=np.float32)
            dense[unit.positions] = unit.values
            if grids not in page_layouts:
                page_layouts.append(grids)
            shown.add(unit.key)
            images_out.append({"record": unit.key, "thumb": file, "value": _round(unit.value),
                               "caption": records[unit.key].caption[:CAPTION_CHARS],
                               "layout": page_layouts.index(grids),
                               "heat": [_b64(_quantise(dense[c], top)) for c in cells]})
        texts_out, peaks = [], []
        for unit in stats.texts.units(latent):
            record, kind = divmod(unit.key, 2)
            kind_name = TOKEN_TYPES[1 + kind]
            token_ids, texts = caption_tokens(record)[kind_name]
            if len(unit.positions) and int(unit.positions.max()) >= len(token_ids):
                raise RuntimeError(f"record {record}: caption token {int(unit.positions.max())} beyond the "
                                   f"{len(token_ids)} tokens the harvester keeps")
            dense = np.zeros(len(token_ids), dtype=np.float32)
            dense[unit.positions] = unit.values
            texts_out.append({"record": record, "type": kind_name, "value": _round(unit.value), "peak": unit.peak,
                              "tokens": texts, "acts": _b64(_quantise(dense, top))})
            if unit.peak_id not in peaks:
                peaks.append(unit.peak_id)
        tokens_here = []
        for token in tok.convert_ids_to_tokens(peaks[:TOP_TOKENS]):
            tokens_here.append(vocab.setdefault(token, len(vocab)))
        top_tokens.append(tokens_here)
        hist = hists[:, latent]
        used = np.flatnonzero(hist.sum(0)).tolist() or [0]
        lo, hi = used[0], used[-1] + 1  # the bins between the first and last nonzero ones
        page = {
            "id": latent, "layer": layer,
            "stats": {name: values[row] for name, values in columns.items() if name not in ("id", "top_tokens")},
            "images": images_out,
            "layouts": page_layouts,
            "texts": texts_out,
            "histogram": {"edges": edges[lo : hi + 1],
                          "counts": {t: hist[i, lo:hi].tolist() for i, t in enumerate(TOKEN_TYPES)}},
            "logits": {"promoted": [[t, _round(v)] for t, v in zip(tok.convert_ids_to_tokens(up_i[row].tolist()),
                                                                     up_v[row].tolist(), strict=True)],
                       "suppressed": [[t, _round(v)] for t, v in zip(tok.convert_ids_to_tokens(down_i[row].tolist()),
                                                                       down_v[row].tolist(), strict=True)]},
            "cosines": {kind: [[names[j], _round(v)] for j, v in zip(order[row], values[row], strict=True)]
                        for kind, (names, order, values) in page_cos.items()},
        }
        text = js_data("LOS_LATENT", page).encode()
        write(out / "data" / "latents" / f"{latent}.js", text)
        page_sizes.append(len(text) + latent_code + sum(thumbs[k][1] for k in shown))  # type: ignore[index]

    latent_ids = columns["id"]
    classes = {kind: {name: [[latent_ids[j], _round(v)] for j, v in zip(order, values, strict=True)]
                      for name, order, values in zip(names, *strongest(c, CLASS_LATENTS, 0), strict=True)}
               for kind, (names, c) in cos.items() if names}
    title = cfg.title or f"layer {layer} SAE ({sae.cfg.d_sae} latents, {sae.cfg.activation})"
    index = {
        "meta": {"title": title, "sae": str(cfg.sae), "model": model_source, "layer": layer, "d_sae": sae.cfg.d_sae,
                 "activation": sae.cfg.activation, "n_records": len(records), "n_skipped": skips.total,
                 "token_types": list(TOKEN_TYPES),
                 "n_tokens": {t: int(stats.tokens[i]) for i, t in enumerate(TOKEN_TYPES)},
                 "thresholds": {"image_only": cfg.image_only, "text_only": cfg.text_only, "dense": cfg.dense},
                 "top_n": cfg.top_n},
        "columns": {**columns, "top_tokens": top_tokens},
        "vocab": list(vocab),
        "dead": (~live).nonzero().squeeze(1).tolist(),
        "dense": (freq["all"] > cfg.dense).nonzero().squeeze(1).tolist(),  # a dead latent has freq 0
        "classes": classes,
    }
    while pending:
        pending.popleft().result()
    writer.shutdown()
    index_text = js_data("LOS_INDEX", index)
    atomic_write_text(out / "data" / "index.js", index_text)  # last: a site with an index is complete
    timings["write"] = time.perf_counter() - t0

    masks = category_masks(modality, cfg.image_only, cfg.text_only)
    index_page = len(index_text.encode()) + sum(p.stat().st_size for p in SITE_DIR.rglob("*")
                                                if p.is_file() and p.name != "latent.html")
    result = {
        "layer": layer, "d_sae": sae.cfg.d_sae, "n_live": len(ids), "n_dead": len(index["dead"]),
        "n_dense": len(index["dense"]), "counts": {cat: int(m.sum()) for cat, m in masks.items()},
        "n_records": len(records), "n_tokens": index["meta"]["n_tokens"], "n_thumbnails": sum(
            1 for v in thumbs.values() if v is not None),
        "bytes": {"index_data": len(index_text.encode()), "index_page": index_page,
                  "latent_page_max": max(page_sizes, default=0),
                  "latent_page_mean": round(sum(page_sizes) / max(len(page_sizes), 1)),
                  "thumbnails": sum(v[1] for v in thumbs.values() if v is not None)},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "skipped": skips.to_dict(), "model": model_source, "sae": str(cfg.sae),
    }
    return run.finish(f"wrote the browser for {len(ids)} live latents of {sae.cfg.d_sae} (layer {layer}) to "
                      f"{out}/index.html; index {index_page / 1e6:.2f} MB, largest latent page "
                      f"{result['bytes']['latent_page_max'] / 1e3:.0f} KB; {skips.summary()}", result, "browser.json")


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
