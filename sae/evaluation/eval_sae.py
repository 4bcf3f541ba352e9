"""Evaluate an SAE on held-out captioned images: sparsity, reconstruction and CE loss recovered,
split by token type.

For every record, the trainer's two passes (``lineofsight/harvest.py``): image + question +
caption, and the caption alone. Over the tokens the SAE was made for (image tokens, caption
tokens in context, caption tokens alone) it measures, overall and per token type:

* ``l0``: mean number of active latents per token;
* ``fvu``: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the evaluated tokens (streamed:
  the mean is taken over all of them);
* ``cosine``: mean cosine between a token's residual and its reconstruction;
* ``dead_frac``: latents never active on these tokens; ``dense_frac``: active on more than
  ``--dense-threshold`` of them.

CE loss recovered, ``1 - (CE_sae - CE_clean) / (CE_zero - CE_clean)``, is the next-token loss on
the caption tokens of pass 1 with the layer's residual replaced by the SAE reconstruction
(``CE_sae``) or by zeros (``CE_zero``) at the image positions, at the caption positions, or at
both (``all``). Tokens are streamed batch by batch: no more than one batch of activations is
held, the later blocks run its 7 variants ``--fork-rows`` rows at a time, the SAE reads
its tokens in chunks, logits exist only for the caption tokens' predecessors (a chunk at a time),
and the metrics' running sums stay on the device until the end. Writes ``eval.json`` and the run record ``run.json`` into ``--out`` (an earlier evaluation
there is replaced only with ``--overwrite``; see ``lineofsight/run.py``) and prints a table.

    python sae/evaluation/eval_sae.py --sae runs/sae/sae --offset 448 --out results/sae/eval   # toy
    python sae/evaluation/eval_sae.py --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 \\
        --sae /scratch/sae-l8/sae --data /data/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json \\
        --image-root /data/sharegpt4v --limit 2000 --out results/sae-l8-eval
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from lineofsight.data import HeldOutRecords
from lineofsight.run import Run, lifecycle
from lineofsight.sae_eval import (  # the evaluation (import_sae --scale auto runs it too)
    GROUPS,
    SPLICES,
    evaluate,
)


@dataclasses.dataclass
class Config(HeldOutRecords):
    """Options for SAE evaluation."""

    sae: Path = Path("runs/sae/sae")
    """SAE folder (sae.safetensors + cfg.json), or a trainer run folder holding sae/."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of tokens counts as dense."""
    out: Path = Path("runs/sae-eval")
    """Folder for eval.json (refused when it holds an earlier evaluation, unless --overwrite)."""
    overwrite: bool = False
    """Replace the evaluation already in --out (other files there are kept)."""
    fork_rows: int | None = None
    """Rows the blocks from --layer on run at once on the 7 variants of the residual (clean + 6 splices), which
    hold 7 x the batch's rows. Default: one batch's rows (the peak stays near a plain harvest's: only the residual
    is 7x); a larger value runs bigger matrix products (faster on a GPU with memory to spare). Results do not
    depend on it."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        super().__post_init__()
        if self.fork_rows is not None and self.fork_rows < 1:
            raise UserError(f"--fork-rows must be positive, got {self.fork_rows}")


def print_table(metrics: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"{'tokens':<16}" + "".join(f"{m:>11}" for m in ("n", "L0", "FVU", "cosine", "dead", "dense")))
    for g in GROUPS:
        row = [str(metrics["n_tokens"][g])] + [fmt(metrics[m][g]) for m in ("l0", "fvu", "cosine", "dead_frac",
                                                                             "dense_frac")]
        print(f"{g:<16}" + "".join(f"{v:>11}" for v in row))
    print("CE loss recovered: " + "  ".join(f"{s} {metrics['ce_recovered'][s]:.3f}" for s in SPLICES)
          + f"  (clean CE {metrics['ce']['clean']:.3f} nats/token)")


@lifecycle("sae/evaluation/eval_sae.py", outputs=("eval.json",))
def main(cfg: Config, run: Run) -> dict[str, Any]:
    from lineofsight.data import SkipCounter, check_resize_match
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_model
    from lineofsight.sae import check_sae_fits, load_sae
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    records = cfg.read_records()
    sae = load_sae(cfg.sae, run.device)
    check_resize_match(cfg.resize, sae.cfg.resize, f"the SAE {cfg.sae}", cfg.allow_resize_mismatch)
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    layer = check_sae_fits(sae, model, model_source, None)
    types = sae.cfg.token_types or ("image", "text_in_context", "text_only")
    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens,
                          types=tuple(set(types) | {"text_in_context"}))
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)

    skips = SkipCounter()
    batches = record_batches(records, range(len(records)), cfg.root, cfg.batch_size, skips, cfg.load_threads,
                             resize=cfg.resize, prepare=harvester.prepare)
    metrics = evaluate(model, sae, harvester, _checked(run, batches), cfg.dense_threshold, cfg.fork_rows)
    metrics.update({"layer": layer, "sae": str(cfg.sae), "model": model_source, "n_records": len(records),
                    "offset": cfg.offset, "skipped": skips.to_dict(), "wall_s": round(time.perf_counter() - start, 1)})
    print_table(metrics)
    return run.finish(f"wrote {run.out / 'eval.json'} ({len(records)} records, layer {layer}); {skips.summary()}",
                      metrics, "eval.json")


def _checked(run: Run, batches: Any) -> Any:
    """``batches``, with :meth:`Run.check_alive` before each."""
    for batch in batches:
        run.check_alive()
        yield batch


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
