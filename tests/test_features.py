"""Streamed per-latent statistics (lineofsight.features) against a brute-force reference over all activations."""

from __future__ import annotations

import numpy as np
import torch

from lineofsight.features import FeatureStats, histogram_edges
from lineofsight.harvest import TokenBatch


def _batch(rng: np.random.Generator, records: list[int], d_sae: int, density: float = 0.3):
    """Tokens of ``records`` (images of 5..12 tokens, captions in context and alone of 2..6) with random sparse
    latents ``[N, d_sae]``."""
    types, samples, ranks = [], [], []
    for r in records:
        for code, n in ((0, rng.integers(5, 13)), (1, rng.integers(2, 7)), (2, rng.integers(2, 7))):
            types += [code] * n
            samples += [r] * n
            ranks += list(range(n))
    n = len(types)
    z = torch.from_numpy(rng.exponential(1.0, (n, d_sae)).astype(np.float32))
    z[torch.from_numpy(rng.random((n, d_sae)) > density)] = 0
    batch = TokenBatch(torch.zeros(n, 1, 2), torch.tensor(types, dtype=torch.uint8), torch.tensor(samples),
                       torch.from_numpy(rng.integers(0, 1000, n)), torch.tensor(ranks))
    return batch, z


def test_streamed_stats_and_top_units_equal_a_brute_force_reference():
    rng = np.random.default_rng(0)
    d_sae, top_n = 7, 3
    stats = FeatureStats(d_sae, top_n)
    batches = [_batch(rng, list(range(lo, lo + 4)), d_sae) for lo in range(0, 20, 4)]
    for batch, z in batches:
        tok, lat = (z > 0).nonzero(as_tuple=True)
        stats.add_sparse(tok, lat, z[tok, lat], batch)
    types = torch.cat([b.token_type for b, _ in batches]).long()
    samples = torch.cat([b.sample for b, _ in batches])
    ranks = torch.cat([b.type_index for b, _ in batches])
    ids = torch.cat([b.token_id for b, _ in batches])
    z = torch.cat([z for _, z in batches])

    for code in range(3):
        sel = types == code
        assert torch.allclose(stats.mass[code], z[sel].double().sum(0))
        assert torch.equal(stats.fires[code], (z[sel] > 0).sum(0))
        assert int(stats.tokens[code]) == int(sel.sum())
        edges = histogram_edges()
        for j in range(d_sae):
            v = z[sel, j][z[sel, j] > 0]
            ref = np.histogram(np.clip(v.numpy(), edges[0].item(), edges[-1].item() * 0.999), edges.numpy())[0]
            assert stats.hist[code, j].tolist() == ref.tolist()
    assert torch.equal(stats.max, z.max(0).values)

    # Units: an image = a record's image tokens; a text sequence = its caption in context, or alone.
    for table, unit_types in ((stats.images, (0,)), (stats.texts, (1, 2))):
        for j in range(d_sae):
            ref = []
            for code in unit_types:
                for r in samples.unique().tolist():
                    sel = (types == code) & (samples == r)
                    col = z[sel, j]
                    if not bool((col > 0).any()):
                        continue
                    at = int(col.argmax())
                    key = r if code == 0 else 2 * r + code - 1
                    ref.append((float(col.max()), key, int(ranks[sel][at]), int(ids[sel][at]),
                                ranks[sel][col > 0].tolist(), col[col > 0].half().float().tolist()))
            ref.sort(key=lambda u: -u[0])
            got = table.units(j)
            assert len(got) == min(top_n, len(ref))
            for unit, (value, key, peak, peak_id, positions, values) in zip(got, ref, strict=False):
                assert (unit.value, unit.key, unit.peak, unit.peak_id) == (value, key, peak, peak_id)
                assert unit.positions.tolist() == positions and unit.values.tolist() == values
            # evicted units leave no payload behind
            assert sum(1 for (lat, _) in table.payload if lat == j) == len(got)


def test_a_unit_that_ties_the_last_kept_value_does_not_displace_it():
    stats = FeatureStats(1, 1)
    for record in (0, 1):
        batch = TokenBatch(torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.uint8), torch.tensor([record]),
                           torch.tensor([5]), torch.tensor([0]))
        stats.add_sparse(torch.tensor([0]), torch.tensor([0]), torch.tensor([2.0]), batch)
    assert [u.key for u in stats.images.units(0)] == [0]


def test_caption_token_ids_are_the_ids_the_harvester_reads(tiny_models):
    from conftest import images

    from lineofsight.harvest import Harvester

    model, processor = tiny_models("next-mistral")
    harvester = Harvester(model, processor, [1], max_caption_tokens=6)
    captions = ["a red circle on the left of a big blue square", "two green triangles"]
    batch = harvester(captions, images([(40, 30), (32, 64)]), [0, 1])
    for record, caption in enumerate(captions):
        want = harvester.caption_token_ids(caption)
        for code, name in ((1, "text_in_context"), (2, "text_only")):
            sel = (batch.sample == record) & (batch.token_type == code)
            assert batch.type_index[sel].tolist() == list(range(int(sel.sum())))
            assert batch.token_id[sel].tolist() == want[name]
