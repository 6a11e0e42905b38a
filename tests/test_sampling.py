"""Sampling: the distribution, its truncation, determinism by seed, and greedy at temperature 0."""

import math

import pytest
import torch

from mpk import sampling
from mpk.ops.tokens import Sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, 1.0])


def draws(logits, temperature, top_k, top_p, n, seed=0):
    return [sampling.sample(logits, temperature, top_k, top_p, seed, pos) for pos in range(n)]


def test_uniform_is_a_fixed_function_of_seed_and_position():
    # Fixed values: the GPU must reproduce this formula bit for bit.
    assert sampling.mix64(0) == 0xE220A8397B1DCDAF
    assert sampling.uniform(0, 0) == (sampling.mix64(sampling.mix64(0)) >> 11) * 2.0**-53
    u = [sampling.uniform(7, p) for p in range(2000)]
    assert all(0 <= x < 1 for x in u) and len(set(u)) == len(u)
    assert abs(sum(u) / len(u) - 0.5) < 0.02


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_sampled_distribution_matches_the_reference_probabilities(temperature, top_k, top_p):
    n = 6000
    ids, probs = sampling.truncated_probs(LOGITS, temperature, top_k, top_p)
    counts = torch.bincount(torch.tensor(draws(LOGITS, temperature, top_k, top_p, n)), minlength=len(LOGITS))
    expected = torch.zeros(len(LOGITS), dtype=torch.float64)
    expected[ids] = probs.double() * n
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = float((((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum())
    dof = int(kept.sum()) - 1
    # 99.9th percentile of chi-square (Wilson-Hilferty), so a correct sampler fails 1 run in 1000 seeds.
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound, counts.tolist(), expected.tolist())


def test_reference_probabilities_are_the_softmax_at_temperature():
    ids, probs = sampling.truncated_probs(LOGITS, 0.5, 0, 1.0)
    want = torch.softmax(LOGITS / 0.5, 0)
    assert torch.allclose(probs, want[ids])
    assert ids[0] == 6 and ids.tolist().index(1) < ids.tolist().index(7)  # ties keep the lower id first


def test_top_k_keeps_exactly_the_k_most_likely():
    seen = set(draws(LOGITS, 5.0, 3, 1.0, 800))
    assert seen == {6, 0, 1}


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.softmax(LOGITS, 0)  # sorted: 6 (.46), 0 (.17), 1 and 7 (.06 each), ...
    top_p = float(probs[6] + probs[0]) + 1e-4  # needs a third token: the lower id of the tie
    assert sampling.truncated_probs(LOGITS, 1.0, 0, top_p)[0].tolist() == [6, 0, 1]
    assert set(draws(LOGITS, 1.0, 0, top_p, 800)) == {6, 0, 1}
    assert set(draws(LOGITS, 1.0, 0, float(probs[6]) - 1e-4, 50)) == {6}  # the nucleus is never empty


def test_same_seed_same_tokens_other_seed_other_tokens():
    assert draws(LOGITS, 1.0, 0, 1.0, 50, seed=5) == draws(LOGITS, 1.0, 0, 1.0, 50, seed=5)
    assert draws(LOGITS, 1.0, 0, 1.0, 50, seed=5) != draws(LOGITS, 1.0, 0, 1.0, 50, seed=6)


def _sample_task(logits, temperature, top_k=0, top_p=1.0, seed=0, step=3):
    """One sample task's reference on a hand-made logits row, with its candidates as the LM head makes them."""
    from mpk.taskgraph import OpSpec

    tile = 4
    vals, idx = logits.view(-1, tile).max(dim=1)
    op = OpSpec.__new__(OpSpec)
    op.params = {"ranks": 1}
    out = torch.tensor([-1])
    t = {"cand_val0": vals[None], "cand_idx0": (idx + torch.arange(0, len(logits), tile))[None],
         "logits0": logits[None], "prompt": torch.zeros(1, 8, dtype=torch.int64), "prompt_len": torch.tensor([1]),
         "sample_floats": torch.tensor([[temperature, top_p]]), "sample_ints": torch.tensor([[top_k, seed]]),
         "tokens": out}
    Sample().run(op, (0,), t, step)
    return int(out[0])


def test_sample_op_is_greedy_at_temperature_zero_and_samples_otherwise():
    assert _sample_task(LOGITS, 0.0) == 6
    got = {_sample_task(LOGITS, 1.0, seed=s) for s in range(200)}
    assert 6 in got and len(got) > 3
    # The op draws for the position after `step`, the one its token takes.
    assert _sample_task(LOGITS, 0.9, top_k=4, seed=11, step=3) == sampling.sample(LOGITS, 0.9, 4, 1.0, 11, 4)
