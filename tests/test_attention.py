"""The attention op kinds' CPU references: run-time splits of the current position, the merge's append,
and the one-pass attention of short contexts."""

import pytest
import torch

from mpk.ops import OP_KINDS
from mpk.ops.attention import split_rows
from mpk.taskgraph import OpSpec


@pytest.mark.parametrize("window", [None, 1, 7])
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_splits_share_the_attended_rows_evenly(splits, window):
    for step in range(40):
        lo = max(0, step + 1 - window) if window else 0
        spans = [split_rows(step, window, s, splits) for s in range(splits)]
        assert spans[0][0] == lo and spans[-1][1] == step + 1  # the last split holds the current row
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [r1 - r0 for r0, r1 in spans]
        assert max(sizes) - min(sizes) <= 1  # every split has work once there are as many rows as splits


def attention_ops(qpk: int, hd: int, splits: int, window):
    heads = dict(q_per_kv=qpk, head_dim=hd, eps=1e-6)
    split = OpSpec("attention", "attention_split", 0, 0, {**heads, "splits": splits, "scale": hd ** -0.5,
                                                          "window": window})
    merge = OpSpec("attn_merge", "attention_merge", 0, 0, heads)
    return split, merge


@pytest.mark.parametrize("step, window, splits", [(0, None, 4), (9, None, 4), (30, None, 3), (30, 8, 3)])
def test_splits_and_merge_compute_attention_and_append_the_row(step, window, splits):
    qpk, hd, seq = 2, 16, 32
    g = torch.Generator().manual_seed(step)
    qkv = torch.randn(1, (qpk + 2) * hd, generator=g)
    rope = torch.cat([torch.ones(seq, hd // 2), torch.zeros(seq, hd // 2)], -1)  # the identity rotation
    k_cache, v_cache = (torch.randn(1, seq, 1, hd, generator=g) for _ in range(2))
    k_cache[0, step:], v_cache[0, step:] = float("nan"), float("nan")  # not written yet: the splits must not read it
    part, lse, out = torch.empty(1, 1, splits, qpk, hd), torch.empty(1, 1, splits, qpk), torch.empty(1, qpk * hd)
    split, merge = attention_ops(qpk, hd, splits, window)
    common = {"qkv": qkv, "rope": rope}
    for s in range(splits):
        OP_KINDS["attention_split"].run(split, (0, 0, s), {**common, "k_cache": k_cache, "v_cache": v_cache,
                                                          "part": part[:, :, s:s + 1], "lse": lse[:, :, s:s + 1]}, step)
    assert not part.isnan().any() and not lse.isnan().any()
    k_before = k_cache.clone()
    OP_KINDS["attention_merge"].run(merge, (0, 0), {"qkv": qkv[:, qpk * hd:], "rope": rope, "part": part, "lse": lse,
                                                    "out": out, "k_cache": k_cache, "v_cache": v_cache}, step)
    heads = qkv.reshape(qpk + 2, hd)
    assert torch.equal(k_cache[0, step, 0], heads[qpk]) and torch.equal(v_cache[0, step, 0], heads[qpk + 1])
    others = torch.arange(seq) != step
    assert torch.equal(k_cache[0, others].nan_to_num(), k_before[0, others].nan_to_num())  # one row appended

    lo = max(0, step + 1 - window) if window else 0
    keys, values = k_cache[0, lo:step + 1, 0], v_cache[0, lo:step + 1, 0]
    want = torch.softmax(heads[:qpk] @ keys.T * hd ** -0.5, -1) @ values
    torch.testing.assert_close(out.reshape(qpk, hd), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step, window", [(0, None), (9, None), (30, None), (30, 8)])
def test_one_pass_attention_equals_one_split_and_its_merge(step, window):
    """`attention` computes what a single split and its merge compute, bit for bit, and appends the same row."""
    qpk, hd, seq = 2, 16, 32
    g = torch.Generator().manual_seed(100 + step)
    qkv = torch.randn(1, (qpk + 2) * hd, generator=g)
    rope = torch.randn(seq, hd, generator=g)
    k_cache, v_cache = (torch.randn(1, seq, 1, hd, generator=g) for _ in range(2))
    k_cache[0, step:], v_cache[0, step:] = float("nan"), float("nan")  # not written yet: must not be read
    k_split, v_split = k_cache.clone(), v_cache.clone()
    split, merge = attention_ops(qpk, hd, 1, window)
    part, lse, want = torch.empty(1, 1, 1, qpk, hd), torch.empty(1, 1, 1, qpk), torch.empty(1, qpk * hd)
    OP_KINDS["attention_split"].run(split, (0, 0, 0), {"qkv": qkv, "rope": rope, "k_cache": k_split, "v_cache": v_split,
                                                      "part": part, "lse": lse}, step)
    OP_KINDS["attention_merge"].run(merge, (0, 0), {"qkv": qkv[:, qpk * hd:], "rope": rope, "part": part, "lse": lse,
                                                    "out": want, "k_cache": k_split, "v_cache": v_split}, step)
    one = OpSpec("attention", "attention", 0, 0, {**split.params})
    del one.params["splits"]
    out = torch.empty(1, qpk * hd)
    OP_KINDS["attention"].run(one, (0, 0), {"qkv": qkv, "rope": rope, "k_past": k_cache, "v_past": v_cache,
                                            "out": out, "k_cache": k_cache, "v_cache": v_cache}, step)
    assert not out.isnan().any() and torch.equal(out, want)
    assert torch.equal(k_cache.nan_to_num(), k_split.nan_to_num()) and torch.equal(v_cache.nan_to_num(), v_split.nan_to_num())
    assert not k_cache[0, step].isnan().any() and k_cache[0, step + 1:].isnan().all()  # exactly row `step` appended
