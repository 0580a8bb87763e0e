"""The serving path's textbook (harness/bugs/serving.py) and its bugs: unchanged, the textbook equals the built-ins
(impl.PAGED, impl.VARLEN) on shuffled, NaN-filled caches, so every catalog bug is that textbook with one step wrong;
each bug moves the output (or its lse) on the case it is written for."""

from __future__ import annotations

import pytest
import torch
from test_paged_impl import packed, paged_batch

from harness.bugs import serving as sv
from harness.bugs.catalog import CATALOG, pick
from impl import PAGED, VARLEN

SERVING = [b.name for b in CATALOG if b.contract in ("paged", "varlen")]
KW = [{}, {"window": (5, 0)}, {"softcap": 4.0}, {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}]


@pytest.mark.parametrize("kw", KW, ids=["plain", "window", "softcap", "sinks"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("page", [1, 16])
def test_the_paged_textbook_equals_the_built_ins(kw, splits, page):
    Sq = 2 if page == 16 else 1
    c = paged_batch([Sq, 15, 16, 17, 40], page=page, Sq=Sq)
    out, lse = sv.paged(splits=splits)(c.q, c.k_cache, c.v_cache, block_table=c.block_table,
                                       cache_seqlens=c.cache_seqlens, **kw)  # fmt: skip
    want, want_lse = c.run("paged_naive", **kw)
    assert torch.isfinite(out).all() and (out - want).abs().max() < 1e-5
    assert torch.where(lse == want_lse, 0.0, (lse - want_lse).abs()).max() < 1e-5  # -inf == -inf: no key


@pytest.mark.parametrize("kw", KW[:3], ids=["plain", "window", "softcap"])
def test_the_varlen_textbook_equals_the_built_in(kw):
    lens = [(1, 1), (5, 5), (3, 20), (17, 17), (0, 6)]
    q, k, v, cq, ck = packed(lens, dtype=torch.float32)
    args = {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "max_seqlen_q": 17, "max_seqlen_k": 20}
    out, lse = sv.varlen()(q, k, v, **args, **kw)
    want, want_lse = VARLEN["varlen_tiled"](q, k, v, **args, **kw)
    assert (out - want).abs().max() < 1e-5
    assert torch.where(lse == want_lse, 0.0, (lse - want_lse).abs()).max() < 1e-5  # -inf == -inf: no key


def test_the_catalog_has_the_serving_bugs_a_third_held_out():
    assert len(SERVING) >= 10, SERVING
    held = [n for n in SERVING if pick(n).held_out]
    assert 3 * len(held) >= len(SERVING), held
    assert {pick(n).stage for n in SERVING} >= {"block_table", "seqlens", "split_merge", "varlen_boundary"}
    assert {pick(n).stage for n in SERVING if pick(n).held_out} >= {"block_table", "seqlens", "split_merge",
                                                                    "varlen_boundary"}  # every stage: an unseen bug


@pytest.mark.parametrize("name", SERVING)
def test_each_bug_moves_the_output(name):
    bug = pick(name)
    if bug.contract == "paged":
        c = paged_batch([1, 15, 16, 17, 40], page=16, Sq=1)
        out, lse = bug.kernel()(c.q, c.k_cache, c.v_cache, block_table=c.block_table, cache_seqlens=c.cache_seqlens)
        want, want_lse = PAGED["paged_naive"](c.q, c.k_cache, c.v_cache, block_table=c.block_table,
                                              cache_seqlens=c.cache_seqlens)  # fmt: skip
    else:
        q, k, v, cq, ck = packed([(5, 5), (3, 20), (17, 17)], dtype=torch.float32)
        args = {"cu_seqlens_q": cq, "cu_seqlens_k": ck, "max_seqlen_q": 17, "max_seqlen_k": 20}
        out, lse = bug.kernel()(q, k, v, **args)
        want, want_lse = VARLEN["varlen_tiled"](q, k, v, **args)
    d_out = torch.nan_to_num((out - want).abs(), nan=1e9).max()
    d_lse = torch.where(lse == want_lse, 0.0, torch.nan_to_num((lse - want_lse).abs(), nan=1e9)).max()
    moved = d_out + d_lse
    assert moved > 1e-2, name
