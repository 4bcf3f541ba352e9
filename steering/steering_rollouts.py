"""Steered rollouts: generate from images of class ``src`` with ``k * v(src@tgt)`` added at one layer.

Work units are pairs x images of ``src`` x prompts x strengths ``k`` (the paper: k in
``linspace(0, 30, 20)``, 10 questions, 100 new tokens). The vector is added to the residual stream
at ``--layer`` (the input of that decoder block) at ``--positions``: ``image`` (default: exactly
the image-token positions, found from ``input_ids``, during the prefill only, so generated tokens
see the edit through the KV cache), ``prompt`` (every prompt position) or ``all`` (prompt and every
generated token). Generation is batched (left padding, KV cache, greedy by default); positions
are resolved per sample, so a batch mixes image sizes, prompts and strengths freely.

Output: ``<out>/rollouts.jsonl``, one record per generation (src, tgt, layer, k, prompt_id,
prompt, image, text, n_tokens, positions), and ``rollouts_summary.json``. An ``--out`` that holds
rollouts is refused unless ``--resume`` (units already written are skipped; rollouts of other
configs in the folder, such as other layers or strengths, are kept) or ``--overwrite``. Under
``torchrun`` the ranks take disjoint contiguous blocks of units and append to
``rollouts.rank{r}.jsonl``; rank 0 merges.

    python steering/steering_rollouts.py --vectors runs/vectors --layer 3 --out runs/rollouts
"""

from __future__ import annotations

import dataclasses
import string
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.models import Dtype
from lineofsight.paths import TOY_WORLD_DIR
from lineofsight.run import Run, lifecycle
from lineofsight.steering import ROLLOUT_OUTPUTS

OUTPUTS = (*ROLLOUT_OUTPUTS, "rollouts_summary.json")


@dataclasses.dataclass
class Config:
    """Options for steered rollouts."""

    vectors: Path
    """Folder written by steering/compute_steering_vectors.py (vectors.safetensors + vectors.json)."""
    layer: int
    """Layer to steer: the input of decoder block L (= hidden_states[L]); must be among the vectors' layers."""
    model: str = "toy"
    """Model: 'toy', an HF id or a local directory (the one the vectors were computed on)."""
    imagenet_dir: Path = TOY_WORLD_DIR / "imagenet"
    """ImageNet-layout root with imagenet_class_index.json; images of each pair's src class are steered."""
    split: str = "val"
    """Split folder to take the source images from (held out from the vectors' split)."""
    pairs: Path | None = None
    """File of src@tgt lines to run (default: every pair in the vectors)."""
    n_pairs: int | None = None
    """Use only the first N pairs."""
    k: tuple[float, ...] = ()
    """Steering strengths (default: the paper's 20 values linspace(0, 30, 20))."""
    normalize: bool = False
    """Make k a multiple of the mean residual norm at --layer (over image tokens): delta = k * mean_norm * v / |v|."""
    prompts: Path | None = None
    """File with one question per line; {src} and {tgt} become the pair's class names (default: the paper's ten questions)."""
    images_per_pair: int = 5
    """Source-class images per pair."""
    max_new_tokens: int = 100
    """Tokens to generate per rollout (the paper: 100)."""
    positions: Literal["image", "prompt", "all"] = "image"
    """Where the vector is added (see the module docstring)."""
    batch_size: int = 32
    """Rollouts generated together."""
    resize: int | None = None
    """Resize images to N x N px before the processor (the paper: 336); must match what made the input (see
    --allow-resize-mismatch)."""
    allow_resize_mismatch: bool = False
    """Run even when --resize differs from the resize the input was made at (a different image-token count and
    grid: normally a mistake)."""
    dtype: Dtype = "float32"
    """Model dtype."""
    device: str | None = None
    """Device (default: this rank's GPU if there is one, else cpu)."""
    out: Path = Path("runs/rollouts")
    """Output folder for rollouts.jsonl."""
    resume: bool = False
    """Continue an earlier run in --out: units already written are skipped, and rollouts of other configs in it (other layers, k, pairs) are kept."""
    overwrite: bool = False
    """Start again: remove the rollouts of an earlier run of this script in --out (nothing else in it is touched)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        for name in ("images_per_pair", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.n_pairs is not None and self.n_pairs < 1:
            raise UserError("--n-pairs must be positive")
        from lineofsight.data import check_resize

        check_resize(self.resize)


def mean_residual_norm(model: Any, processor: Any, images: list[Any], prompt: str, layer: int) -> float:
    """Mean L2 norm of the residual at ``layer`` over the image-token positions of ``images``."""
    import torch

    from lineofsight.hooks import Trace
    from lineofsight.models import image_token_mask, residual_site, vlm_inputs

    inputs = vlm_inputs(model, processor, images, [prompt] * len(images))
    with torch.no_grad(), Trace(model, residual_site(model, layer), retain_input=True, retain_output=False,
                                stop=True) as tr:
        model(**inputs)
    mask = image_token_mask(inputs["input_ids"], model)
    return float(tr.input[mask].float().norm(dim=-1).mean())


def greedy_decode(model: Any, inputs: dict[str, Any], max_new_tokens: int, eos_id: int, pad_id: int) -> Any:
    """Greedy decoding with the KV cache for a left-padded batch: ``[B, n]`` new tokens (``pad_id``
    after a row's EOS; n stops early once every row has ended).

    The same computation as ``model.generate(do_sample=False)`` (position ids counted over the unpadded
    tokens, or M-RoPE's from the image grids: ``prompt_positions``; one cached step per token) without its
    per-step machinery, which dominates the time of small models; a test checks the tokens are identical to
    ``generate``'s.
    """
    import torch

    from lineofsight.models import prompt_positions

    attention = inputs["attention_mask"]
    positions = prompt_positions(model, inputs)  # [B, T], or M-RoPE's [3, B, T]
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    done = torch.zeros(attention.shape[0], dtype=torch.bool, device=attention.device)
    last = positions[..., -1:]
    tokens = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], 1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=last, cache=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return torch.stack(tokens, 1) if tokens else attention.new_zeros(attention.shape[0], 0)


def generate_steered(model: Any, processor: Any, images: list[Any], prompts: list[str], delta_BD: Any,
                     layer: int, positions: str, max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy batched generation with ``delta_BD[b]`` added at ``layer``; texts and new-token counts."""
    import torch

    from lineofsight.models import vlm_inputs
    from lineofsight.steering import steer

    tok = processor.tokenizer
    inputs = vlm_inputs(model, processor, images, prompts)  # each distinct (image, prompt) encoded once
    with torch.no_grad(), steer(model, layer, delta_BD, inputs["input_ids"], inputs["attention_mask"], positions):
        new_BT = greedy_decode(model, inputs, max_new_tokens, tok.eos_token_id, tok.pad_token_id)
    n_tokens = []
    for row in new_BT.tolist():
        n = len(row)
        if tok.eos_token_id in row:
            n = row.index(tok.eos_token_id) + 1
        n_tokens.append(n)
    texts = [t.strip() for t in tok.batch_decode(new_BT, skip_special_tokens=True)]
    return texts, n_tokens


@lifecycle("steering/steering_rollouts.py", outputs=OUTPUTS, resumable=True)
def main(cfg: Config, run: Run) -> Path:
    import torch
    from tqdm import tqdm

    from lineofsight import dist
    from lineofsight.cli import UserError
    from lineofsight.data import (
        ClassIndex,
        SkipCounter,
        check_resize_match,
        imagenet_items,
        load_image,
        pair_key,
        read_class_pairs,
        recorded_resize,
    )
    from lineofsight.io import read_text
    from lineofsight.models import check_layer, check_model, format_prompt
    from lineofsight.prompts import ROLLOUT_QUESTIONS
    from lineofsight.steering import (
        append_rollouts,
        load_vectors,
        merge_rollouts,
        paper_strengths,
        read_rollout_folder,
        rollout_key,
        vector_pairs,
    )
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    info = run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.imagenet_dir)
    vectors, vec_info = load_vectors(cfg.vectors, cfg.layer)
    check_resize_match(cfg.resize, recorded_resize(vec_info), f"the steering vectors in {cfg.vectors}",
                       cfg.allow_resize_mismatch)
    pairs = read_class_pairs(cfg.pairs) if cfg.pairs else vector_pairs(vec_info)
    pairs = pairs[: cfg.n_pairs]
    for src, tgt in pairs:
        if pair_key(src, tgt) not in vectors:
            raise UserError(f"no steering vector for {pair_key(src, tgt)} at layer {cfg.layer} in {cfg.vectors}")
    questions = list(ROLLOUT_QUESTIONS)
    if cfg.prompts is not None:
        questions = [line.strip() for line in read_text(cfg.prompts, "--prompts file").splitlines() if line.strip()]
        if not questions:
            raise UserError(f"--prompts {cfg.prompts} holds no questions")
    for q in questions:
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(q) if field is not None}
        except ValueError:
            fields = {"?"}
        if fields - {"src", "tgt"}:
            raise UserError(f"prompt {q!r}: the only placeholders allowed are {{src}} and {{tgt}}")
    strengths = list(cfg.k) or paper_strengths()
    index = ClassIndex.read(cfg.imagenet_dir)
    check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    check_layer(model, cfg.layer)
    processor.tokenizer.padding_side = "left"

    def prompt_text(prompt_id: int, src: str, tgt: str) -> tuple[str, str]:
        """(question, full model prompt) with the pair's class names filled in."""
        q = questions[prompt_id].format(src=src.replace("_", " "), tgt=tgt.replace("_", " "))
        return q, format_prompt(processor, q)

    # Work units, in a fixed order: pair, image, prompt, k.
    skips = SkipCounter()
    images: dict[str, Any] = {}
    units = []
    for src, tgt in pairs:
        items = imagenet_items(cfg.imagenet_dir, cfg.split, [index.label(src)], index, cfg.images_per_pair)
        for item in items:
            if item.path not in images:
                images[item.path] = load_image(cfg.imagenet_dir / item.path, skips, cfg.resize)
            if images[item.path] is None:
                continue
            for prompt_id in range(len(questions)):
                for k in strengths:
                    units.append({"src": src, "tgt": tgt, "layer": cfg.layer, "k": round(float(k), 6),
                                  "prompt_id": prompt_id, "prompt": prompt_text(prompt_id, src, tgt)[0],
                                  "image": item.path, "positions": cfg.positions})
    if not units:
        raise UserError(f"no readable source images in {cfg.imagenet_dir / cfg.split} ({skips.summary()})")

    scale = 1.0
    if cfg.normalize:
        sample = [im for im in images.values() if im is not None][: cfg.batch_size]
        scale = mean_residual_norm(model, processor, sample, format_prompt(processor, questions[0]), cfg.layer)
        dist.print0(f"--normalize: mean residual norm at layer {cfg.layer} is {scale:.3f}")

    resumed = run.open(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
    done = read_rollout_folder(run.out) if resumed else {}
    # Contiguous blocks per rank, so that a rank's batches keep each k sweep together (one image and
    # prompt at many strengths, encoded once by vlm_inputs).
    first, end = info.rank * len(units) // info.world_size, (info.rank + 1) * len(units) // info.world_size
    mine = [u for u in units[first:end] if rollout_key(u) not in done]
    dist.print0(f"{len(units)} rollouts ({len(pairs)} pairs x {len(strengths)} k x {len(questions)} prompts x "
                f"<= {cfg.images_per_pair} images); {sum(rollout_key(u) in done for u in units)} already written")
    n_tokens_total = 0
    progress = tqdm(total=len(mine), desc="rollouts", unit="gen", disable=not info.is_main)
    t0 = time.perf_counter()
    with append_rollouts(run.out / f"rollouts.rank{info.rank}.jsonl") as write:
        for lo in range(0, len(mine), cfg.batch_size):
            run.check_alive()
            batch = mine[lo : lo + cfg.batch_size]
            deltas = []
            for u in batch:
                v = vectors[pair_key(u["src"], u["tgt"])].float()
                deltas.append(u["k"] * (scale * v / v.norm() if cfg.normalize else v))
            texts, n_tokens = generate_steered(
                model, processor, [images[u["image"]] for u in batch], [format_prompt(processor, u["prompt"]) for u in batch],
                torch.stack(deltas), cfg.layer, cfg.positions, cfg.max_new_tokens,
            )
            write([{**u, "text": text, "n_tokens": n} for u, text, n in zip(batch, texts, n_tokens)])
            n_tokens_total += sum(n_tokens)
            progress.update(len(batch))
            progress.set_postfix(tok_s=f"{n_tokens_total / (time.perf_counter() - t0):.0f}")
    progress.close()
    dist.barrier()
    n_on_disk = merge_rollouts(run.out, units) if info.is_main else 0
    summary = {"k": strengths, "questions": questions, "residual_scale": scale, "n_units": len(units),
               "n_rollouts_on_disk": n_on_disk, "skipped": skips.to_dict()}
    run.finish(f"wrote {run.out / 'rollouts.jsonl'}: {n_on_disk} rollouts on disk ({len(units)} of this config), "
               f"{n_tokens_total} new tokens by rank 0 in {time.perf_counter() - start:.1f}s; {skips.summary()}",
               summary, "rollouts_summary.json")
    return run.out / "rollouts.jsonl"


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
