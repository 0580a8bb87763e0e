"""Property tests (hypothesis): every implementation against transformers over random small configs and inputs.

Drawn: head_dim {8, 16, 32}, Hkv {1, 2, 3}, group size g {1, 2, 3}, hidden size, seq 1..40, batch 1..3, rope type
default / llama3, position ids (contiguous, offset, restarting, sparse up to 131071; per row), left padding (at
least one real token per row). Every entry of impl.IMPLEMENTATIONS must match transformers' LlamaAttention
(float32, same float32 RoPE angles) at 1e-4 on the non-padding rows and be finite everywhere, padding rows too.
And tiled.flash_forward with random block sizes (1..70), Sq <= Sk and random key masks (holes, fully masked rows)
matches naive.core and a float64 computation (out and lse).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.reference import Reference
from impl import IMPLEMENTATIONS, INTERPRETED_ON_CPU, naive, tiled

TOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
MAX_POS = 131071

WORST: dict[str, float] = {}


def note(key, err):
    WORST[key] = max(WORST.get(key, 0.0), float(err))


def maxerr(a, b) -> float:
    d = (a.double() - b.double()).abs()
    return float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0


@pytest.fixture(scope="module", autouse=True)
def _summary():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops on a shared 2-core machine: one thread is far faster
    yield
    torch.set_num_threads(threads)
    print("\n[test_properties] largest errors measured:")
    for k in sorted(WORST):
        print(f"  {k:45s} {WORST[k]:.3e}")


@st.composite
def positions(draw, B, S):
    """int64 [B, S] position ids of one drawn kind, independently per row."""
    kind = draw(st.sampled_from(["contiguous", "offset", "restarting", "sparse"]))
    rows = []
    for _ in range(B):
        if kind == "contiguous":
            row = list(range(S))
        elif kind == "offset":
            off = draw(st.integers(0, MAX_POS - S + 1))
            row = list(range(off, off + S))
        elif kind == "restarting":  # packed documents: positions restart at 0 at each cut
            cuts = sorted(draw(st.sets(st.integers(1, max(1, S - 1)), max_size=4))) if S > 1 else []
            row, start = [], 0
            for end in [*cuts, S]:
                row += list(range(end - start))
                start = end
        else:  # sparse, increasing, anywhere up to 131071
            row = sorted(draw(st.lists(st.integers(0, MAX_POS), min_size=S, max_size=S, unique=True)))
        rows.append(row)
    return kind, torch.tensor(rows, dtype=torch.long)


@st.composite
def cases(draw):
    d = draw(st.sampled_from([8, 16, 32]))
    Hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    D = Hkv * g * draw(st.sampled_from([4, 8, 16]))  # hidden: transformers wants a multiple of H; != H*d mostly
    B = draw(st.integers(1, 3))
    S = draw(st.integers(1, 40))
    rope = draw(st.sampled_from(["default", "llama3"]))
    kind, pos = draw(positions(B, S))
    pads = [draw(st.integers(0, S - 1)) for _ in range(B)] if draw(st.booleans()) else None
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(d=d, Hkv=Hkv, H=Hkv * g, D=D, B=B, S=S, rope=rope, kind=kind, pos=pos, pads=pads, seed=seed)


def build(c):
    cfg = {
        "hidden_size": c["D"],
        "num_attention_heads": c["H"],
        "num_key_value_heads": c["Hkv"],
        "head_dim": c["d"],
        "rope_parameters": dict(LLAMA3 if c["rope"] == "llama3" else DEFAULT),
        "max_position_embeddings": MAX_POS + 1,
        "rms_norm_eps": 1e-5,
        "num_hidden_layers": 1,
        "vocab_size": 100,
        "intermediate_size": 64,
        "model_type": "llama",
    }
    gen = torch.Generator().manual_seed(c["seed"])
    H, Hkv, d, D = c["H"], c["Hkv"], c["d"], c["D"]
    w = {
        "q_proj": torch.randn(H * d, D, generator=gen) * 1.5 / D**0.5,
        "k_proj": torch.randn(Hkv * d, D, generator=gen) * 1.5 / D**0.5,
        "v_proj": torch.randn(Hkv * d, D, generator=gen) / D**0.5,
        "o_proj": torch.randn(D, H * d, generator=gen) / (H * d) ** 0.5,
    }
    x = torch.randn(c["B"], c["S"], D, generator=gen)
    mask = None
    if c["pads"] is not None:
        mask = torch.ones(c["B"], c["S"], dtype=torch.long)
        for b, p in enumerate(c["pads"]):
            mask[b, :p] = 0
    return cfg, w, x, mask


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_implementation_matches_transformers(c):
    cfg, w, x, mask = build(c)
    pos = c["pos"]
    want = Reference(cfg, w)(x, pos, mask)
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.bool()  # rows that are tokens
    assert real.any(dim=1).all()
    for name, fn in IMPLEMENTATIONS.items():
        if name in INTERPRETED_ON_CPU:  # Triton's interpreter: tests/test_triton.py
            continue
        got = fn(x, w, config=cfg, position_ids=pos, attention_mask=mask)
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert torch.isfinite(got).all(), f"{name}: non-finite output"
        err = maxerr(got[real], want[real])
        note(f"{name} vs HF ({c['kind']} positions)", err)
        assert err <= TOL, f"{name}: {err} ({c})"


@st.composite
def core_cases(draw):
    d = draw(st.sampled_from([8, 16, 32]))
    Hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    Sk = draw(st.integers(1, 90))
    Sq = draw(st.integers(1, Sk))
    bq, bk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    # key masks: none, left padding, or arbitrary holes (rows may end up with nothing to attend to)
    mask_kind = draw(st.sampled_from(["none", "left", "holes"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(d=d, Hkv=Hkv, H=Hkv * g, B=B, Sq=Sq, Sk=Sk, bq=bq, bk=bk, mask=mask_kind, seed=seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(core_cases())
def test_tiled_random_blocks_match_naive(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, Sq, Sk, d = c["B"], c["H"], c["Hkv"], c["Sq"], c["Sk"], c["d"]
    q = torch.randn(B, H, Sq, d, generator=gen) * 1.5
    k = torch.randn(B, Hkv, Sk, d, generator=gen) * 1.5
    v = torch.randn(B, Hkv, Sk, d, generator=gen)
    mask = None
    if c["mask"] == "left":
        pads = torch.randint(0, Sk, (B,), generator=gen)
        mask = (torch.arange(Sk)[None] >= pads[:, None]).long()
    elif c["mask"] == "holes":
        mask = (torch.rand(B, Sk, generator=gen) < 0.6).long()
    out, lse = tiled.flash_forward(q, k, v, mask, block_q=c["bq"], block_k=c["bk"])
    ref = naive.core(q, k, v, attention_mask=mask)
    assert torch.isfinite(out).all()
    err = maxerr(out, ref)
    note("tiled (random blocks) vs naive", err)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # lse vs float64 logsumexp of the masked scaled scores (-inf exactly where nothing may be attended to)
    s = q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-2, -1) / math.sqrt(d)
    keep = (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq))[None, None]
    if mask is not None:
        keep = keep & mask.bool()[:, None, None, :]
    want = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)
    empty = ~keep.any(-1).expand(B, H, Sq)
    assert (out[empty] == 0).all()
