"""Which SAE latents are visual, textual or shared, layer by layer (the paper's modality figure).

For one SAE per layer, over held-out captioned images (the trainer's two passes, all SAE layers
read in one forward), every latent gets

* a **modality score** ``mass_image / (mass_image + mass_text)``: the share of its activation mass
  that falls on image tokens (text = caption tokens in context and alone); 1 means it fires only on
  image tokens, 0 only on text;
* a **frequency score** ``f_image / (f_image + f_text)`` with ``f`` the fraction of tokens of that
  modality it fires on (insensitive to how many tokens of each kind there are).

Latents that never fire are left out. A live latent is image-only when its score is at least
``--image-only``, text-only when at most ``--text-only``, shared in between. Outputs in ``--out``
(with the run record ``run.json``; an earlier analysis there is replaced only with ``--overwrite``):
``modality.json`` (per layer: shares of each category for both scores, histograms),
``modality_by_layer.png`` (shares vs layer: the paper's "increasingly shared in deeper layers"),
``modality_hist.png`` (score histograms per layer) and, for the strongest latent of each category
in each layer, ``latent_L<layer>_<id>.png``: its top-activating images (the activating patch boxed
when it is one of the base tile's patches) and its top text tokens in context.

    python sae/evaluation/modality.py --saes runs/sae-l1/sae runs/sae-l3/sae runs/sae-l5/sae --out results/sae
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lineofsight.data import HeldOutRecords
from lineofsight.features import (
    CATEGORIES,
    IMAGE_ONLY,
    TEXT_ONLY,
    categorise,
    category_masks,
    modality_scores,
)
from lineofsight.run import Run, lifecycle

OUTPUTS = ("modality.json", "modality_by_layer.png", "modality_hist.png", "latent_L*.png")
"""What the script writes into --out (what --overwrite removes)."""


@dataclasses.dataclass
class Config(HeldOutRecords):
    """Options for the modality analysis."""

    saes: tuple[Path, ...] = ()
    """SAE folders, or trainer run folders (a run stands for all the SAEs in its saes/), one SAE per layer, all for
    --model."""
    image_only: float = IMAGE_ONLY
    """A live latent with modality score >= this is image-only."""
    text_only: float = TEXT_ONLY
    """A live latent with modality score <= this is text-only (between the two: shared)."""
    top_k: int = 6
    """Top-activating images and text tokens shown per latent."""
    out: Path = Path("runs/modality")
    """Output folder (refused when it holds an earlier analysis, unless --overwrite)."""
    overwrite: bool = False
    """Replace the analysis already in --out (other files there are kept)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        super().__post_init__()
        if not self.saes:
            raise UserError("--saes needs at least one SAE folder")
        if not 0 <= self.text_only < self.image_only <= 1:
            raise UserError("need 0 <= --text-only < --image-only <= 1")


class LatentStats:
    """Streamed per-latent sums for one SAE: activation mass and firing counts per token type, and
    the top-k activations per latent (value and a global token number)."""

    def __init__(self, d_sae: int, top_k: int) -> None:
        import torch

        self.mass = torch.zeros(3, d_sae, dtype=torch.float64)
        self.fires = torch.zeros(3, d_sae, dtype=torch.long)
        self.tokens = torch.zeros(3, dtype=torch.long)
        self.top_val = torch.full((2, d_sae, top_k), -1.0)  # [image, text] x latent x k
        self.top_tok = torch.full((2, d_sae, top_k), -1, dtype=torch.long)

    def add(self, latents: Any, types: Any, token_numbers: Any) -> None:
        import torch

        latents = latents.float().cpu()
        for code in range(3):
            sel = types == code
            self.mass[code] += latents[sel].double().sum(0)
            self.fires[code] += (latents[sel] > 0).sum(0)
            self.tokens[code] += int(sel.sum())
        for group, sel in enumerate((types == 0, types != 0)):
            if not bool(sel.any()):
                continue
            vals = torch.cat([self.top_val[group], latents[sel].T], 1)
            toks = torch.cat([self.top_tok[group], token_numbers[sel][None].expand(vals.shape[0], -1)], 1)
            k = self.top_val.shape[2]
            best = vals.topk(k, dim=1)
            self.top_val[group], self.top_tok[group] = best.values, toks.gather(1, best.indices)

    def scores(self) -> dict[str, Any]:
        text_mass = self.mass[1] + self.mass[2]
        freq = self.fires.double() / self.tokens.clamp(min=1)[:, None].double()
        text_freq = (self.fires[1] + self.fires[2]).double() / max(int(self.tokens[1] + self.tokens[2]), 1)
        return {"mass": modality_scores(self.mass[0], text_mass), "frequency": modality_scores(freq[0], text_freq)}


def plot_shares(per_layer: dict[int, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    layers = sorted(per_layer)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, score in zip(axes, ("mass", "frequency"), strict=True):
        for cat, colour in zip(CATEGORIES, ("tab:orange", "tab:purple", "tab:blue"), strict=True):
            ax.plot(layers, [per_layer[layer][score][cat] for layer in layers], "o-", color=colour,
                    label=cat.replace("_", "-"))
        ax.set_xlabel("layer")
        ax.set_title(f"{score}-based modality score")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of live latents")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_histograms(hists: dict[int, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    layers = sorted(hists)
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 2.8), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers, strict=True):
        s = hists[layer]
        ax.hist(s[~s.isnan()].numpy(), bins=20, range=(0, 1), color="tab:gray")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("modality score (0 text, 1 image)")
    axes[0][0].set_ylabel("latents")
    fig.tight_layout()
    save_figure(fig, path)


def plot_latent(layer: int, latent: int, score: float, images: list[tuple[Any, float, Any]],
                texts: list[tuple[str, float]], path: Path) -> None:
    """Top images (with the activating base-tile patch boxed when known) and top text tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from lineofsight.io import save_figure

    n = max(1, len(images))
    fig = plt.figure(figsize=(2.1 * n + 3.5, 2.6))
    for i, (image, value, box) in enumerate(images):
        ax = fig.add_subplot(1, n + 2, i + 1)
        ax.imshow(image)
        if box is not None:
            x0, y0, w, h = box
            ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor="white", linewidth=2))
            ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor="black", linewidth=1, linestyle="--"))
        ax.set_title(f"{value:.2f}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(1, n + 2, (n + 1, n + 2))
    ax.axis("off")
    lines = [f"{v:5.2f}  {t}" for t, v in texts] or ["(no text activations)"]
    ax.text(0, 1, "top text tokens ([token] in context):\n" + "\n".join(lines), va="top", family="monospace",
            fontsize=7)
    fig.suptitle(f"layer {layer}, latent {latent}: modality score {score:.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def base_patch_box(type_index: int, image: Any, processor: Any) -> tuple[float, float, float, float] | None:
    """Pixel box (x, y, w, h) of image token ``type_index`` when it is a patch of the base tile
    (the whole image resized to one tile: the first tokens of every LLaVA / LLaVA-NeXT image)."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    tile = crop.get("height") or (ip.size.get("shortest_edge") if isinstance(ip.size, dict) else None)
    patch = getattr(processor, "patch_size", None)
    if not tile or not patch:
        return None
    side = tile // patch
    if type_index >= side * side:
        return None
    row, col = divmod(type_index, side)
    w, h = image.size
    return (col * w / side, row * h / side, w / side, h / side)


@lifecycle("sae/evaluation/modality.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    import torch

    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter, check_resize_match, load_image
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_model
    from lineofsight.sae import check_sae_fits, load_saes
    from lineofsight.toy import ensure_toy_world

    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    records = cfg.read_records()
    saes = load_saes(cfg.saes, run.device)  # a trainer run stands for all its SAEs
    for sae in saes:
        check_resize_match(cfg.resize, sae.cfg.resize, f"the SAE of layer {sae.cfg.layer}", cfg.allow_resize_mismatch)
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    layers = [check_sae_fits(sae, model, model_source, None) for sae in saes]
    if len(set(layers)) != len(layers):
        raise UserError(f"--saes: one SAE per layer expected, got layers {layers}")
    harvester = Harvester(model, processor, sorted(set(layers)), max_caption_tokens=cfg.max_caption_tokens)
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)
    device = run.device

    stats = [LatentStats(sae.cfg.d_sae, cfg.top_k) for sae in saes]
    registry: list[Any] = []  # per harvested batch: (sample, type, type_index, token_id)
    skips = SkipCounter()
    root = cfg.root
    n_seen = 0
    for idx, captions, images in record_batches(records, range(len(records)), root, cfg.batch_size, skips,
                                                cfg.load_threads, resize=cfg.resize, prepare=harvester.prepare):
        run.check_alive()
        if not idx:
            continue
        batch = harvester(captions, images, idx)
        numbers = torch.arange(n_seen, n_seen + len(batch))
        n_seen += len(batch)
        registry.append(torch.stack([batch.sample, batch.token_type.long(), batch.type_index, batch.token_id], 1))
        for sae, st, layer in zip(saes, stats, layers, strict=True):
            x = batch.acts[:, harvester.layers.index(layer)].to(device)
            with torch.no_grad():
                st.add(sae.encode(x), batch.token_type, numbers)
    if n_seen == 0:
        raise UserError(f"no tokens harvested ({skips.summary()})")
    reg = torch.cat(registry)

    out = run.out
    per_layer: dict[int, dict[str, Any]] = {}
    hists: dict[int, Any] = {}
    examples: dict[str, Any] = {}
    tok = processor.tokenizer
    for st, layer in zip(stats, layers, strict=True):
        scores = st.scores()
        hists[layer] = scores["mass"]
        per_layer[layer] = {k: categorise(v, cfg.image_only, cfg.text_only) for k, v in scores.items()}
        per_layer[layer]["histogram"] = torch.histc(scores["mass"][~scores["mass"].isnan()], bins=10, min=0,
                                                    max=1).long().tolist()
        per_layer[layer]["tokens_by_type"] = st.tokens.tolist()
        s = scores["mass"]
        masks = category_masks(s, cfg.image_only, cfg.text_only)
        total_mass = st.mass.sum(0)
        for cat in CATEGORIES:
            sel = masks[cat]
            if not bool(sel.any()):
                continue
            latent = int(torch.where(sel, total_mass, torch.full_like(total_mass, -1)).argmax())
            shown_images, seen_records = [], set()
            for value, number in zip(st.top_val[0, latent].tolist(), st.top_tok[0, latent].tolist(), strict=True):
                if number < 0 or value <= 0:
                    continue
                sample, _, type_index, _ = reg[number].tolist()
                if sample in seen_records:
                    continue
                seen_records.add(sample)
                image = load_image(Path(root) / records[sample].image, resize=cfg.resize)  # as harvested
                if image is not None:
                    shown_images.append((image, value, base_patch_box(type_index, image, processor)))
            shown_texts = []
            for value, number in zip(st.top_val[1, latent].tolist(), st.top_tok[1, latent].tolist(), strict=True):
                if number < 0 or value <= 0:
                    continue
                sample, kind, type_index, _ = reg[number].tolist()
                ids = tok(records[sample].caption, add_special_tokens=False)["input_ids"]
                lo, hi = max(0, type_index - 4), type_index + 3
                words = [tok.decode([t]) for t in ids[lo:hi]]
                if 0 <= type_index - lo < len(words):
                    words[type_index - lo] = f"[{words[type_index - lo]}]"
                where = "alone" if kind == 2 else "ctx"
                shown_texts.append((f"({where}) " + " ".join(words), value))
            path = out / f"latent_L{layer}_{latent}.png"
            plot_latent(layer, latent, float(s[latent]), shown_images, shown_texts, path)
            examples[f"{layer}/{cat}"] = {"latent": latent, "score": float(s[latent]), "plot": path.name}
    plot_shares(per_layer, out / "modality_by_layer.png")
    plot_histograms(hists, out / "modality_hist.png")
    result = {"layers": {str(k): v for k, v in sorted(per_layer.items())}, "examples": examples,
              "thresholds": {"image_only": cfg.image_only, "text_only": cfg.text_only},
              "n_records": len(records), "n_tokens": n_seen, "skipped": skips.to_dict(), "model": model_source,
              "saes": [str(p) for p in cfg.saes]}
    print(f"{'layer':>5} {'live':>6} " + " ".join(f"{c:>11}" for c in CATEGORIES) + "   (mass-based score)")
    for layer in sorted(per_layer):
        m = per_layer[layer]["mass"]
        print(f"{layer:>5} {m['n_live']:>6} " + " ".join(f"{m[c]:>11.3f}" for c in CATEGORIES))
    return run.finish(f"wrote {out}/modality.json, modality_by_layer.png, modality_hist.png and "
                      f"{len(examples)} latent plots ({n_seen} tokens of {len(records)} records); {skips.summary()}",
                      result, "modality.json")


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
