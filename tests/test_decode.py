"""impl.decode (KV cache) against transformers' LlamaAttention with a DynamicCache, and against one full pass.

For each core of impl.CORES (naive, loop, tiled, sdpa): a 20-token prefill then 32 single-token steps equal HF's layer
decoding with a DynamicCache, step by step, at 1e-4 (float32), on the exact Llama-3.2-1B config (synthetic
weights) and on SmolLM2-135M (real weights); multi-token steps too. Prefill-then-decode equals one full pass of
the matching IMPLEMENTATIONS entry; left padding in a batch of 2 (mask covering cache + new tokens) equals the
full pass and HF on the non-padding rows; the cache grows by one per step and holds the rotated keys.

Run with `-s` to see the largest errors measured.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from harness.checkpoints.format import load_fixture
from harness.reference import Reference, Reference64
from impl import CORES, IMPLEMENTATIONS, INTERPRETED_ON_CPU, decode
from impl.projection import project_qkv

TOL = 1e-4
COMPILED = [c for c in CORES if c not in INTERPRETED_ON_CPU]  # the interpreted kernel: one test below
PREFILL, STEPS = 20, 32
FIXTURES = ["llama-3.2-1b-synthetic", "smollm2-135m"]

WORST: dict[str, float] = {}


def note(key: str, err: float) -> float:
    WORST[key] = max(WORST.get(key, 0.0), float(err))
    return float(err)


def maxerr(a, b) -> float:
    d = (a.double() - b.double()).abs()
    return float("inf") if torch.isnan(d).any() else float(d.max())


@pytest.fixture(scope="module", autouse=True)
def _summary():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared 2-core machine: one thread is far faster
    yield
    torch.set_num_threads(threads)
    print("\n[test_decode] largest errors measured:")
    for k in sorted(WORST):
        print(f"  {k:50s} {WORST[k]:.3e}")


@pytest.fixture(scope="module")
def fixtures():
    out = {}
    for name in FIXTURES:
        f = load_fixture(name)
        out[name] = (f.config, {k: v.float() for k, v in f.weights.items()}, f.inputs)
    return out


def hidden(B, S, D, seed):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))  # std 1, like normed inputs


# Decoding cases: (fixture, inputs). "randn": random hidden states of std 1, prefill 20 + 32 steps. "prompt": the
# fixture's real layer input (SmolLM2's 41-token prompt), prefill 9 + 32 steps. SmolLM2's real layer-0 input has
# std ~0.045; at std 1 its real q/k weights give scores of std ~70 (max ~600), a nearly one-hot softmax on which
# float32 itself is only good to ~1e-4 (transformers' own float32 output is 0.8-1.8e-4 from its float64 output).
CASES = ["llama-3.2-1b-synthetic/randn", "smollm2-135m/randn", "smollm2-135m/prompt"]


@pytest.fixture(scope="module")
def cases(fixtures):
    out = {}
    for case in CASES:
        name, kind = case.split("/")
        cfg, w, inputs = fixtures[name]
        if kind == "randn":
            x, prefill = hidden(1, PREFILL + STEPS, cfg["hidden_size"], seed=len(case)), PREFILL
        else:
            x = inputs["hidden_states"].float()
            prefill = x.shape[1] - STEPS
            assert prefill >= 1
        pos = torch.arange(x.shape[1])[None]
        ref = Reference(cfg, w)
        exact = Reference64(cfg, w)(x, pos)  # float64 yardstick
        # float32's own noise on this input: transformers' float32 full pass vs its float64 one
        hf_noise = maxerr(ref(x, pos), exact)
        out[case] = dict(cfg=cfg, w=w, x=x, pos=pos, prefill=prefill, ref=ref, exact=exact, hf_noise=hf_noise)
    return out


def positions_from_mask(mask):
    """HF's convention for left padding: real tokens at 0, 1, ...; padding at 0 (never attended to)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def impl_decode(core, x, w, cfg, pos, chunks, mask=None):
    """Run chunks (list of lengths) through decode.step with one fresh KVCache; list of outputs and lengths."""
    cache = decode.KVCache()
    outs, lengths, t = [], [], 0
    for n in chunks:
        m = None if mask is None else mask[:, : t + n]
        outs.append(
            decode.step(
                core, x[:, t : t + n], w, config=cfg, position_ids=pos[:, t : t + n], cache=cache, attention_mask=m
            )
        )
        t += n
        lengths.append(cache.length())
    return outs, lengths, cache


def hf_decode(ref, x, pos, chunks, mask=None):
    cache = DynamicCache()
    outs, t = [], 0
    for n in chunks:
        m = None if mask is None else mask[:, : t + n]
        outs.append(ref(x[:, t : t + n], pos[:, t : t + n], attention_mask=m, past_key_values=cache))
        t += n
        assert cache.get_seq_length() == t
    return outs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("core", COMPILED)
def test_decode_matches_hf_dynamic_cache(cases, case, core):
    c = cases[case]
    S, prefill = c["x"].shape[1], c["prefill"]
    chunks = [prefill] + [1] * STEPS
    want = hf_decode(c["ref"], c["x"], c["pos"], chunks)
    got, lengths, _ = impl_decode(CORES[core], c["x"], c["w"], c["cfg"], c["pos"], chunks)
    assert lengths == list(range(prefill, S + 1))
    assert len(got) == 1 + STEPS
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape
        err = note(f"{core} decode vs HF DynamicCache ({case})", maxerr(a, b))
        assert err <= TOL, f"step {i}: {err}"
    # against float64: as accurate as transformers' own float32 decode (2x its error, + a 1e-5 floor)
    hf_err = maxerr(torch.cat(want, 1), c["exact"])
    err = note(f"{core} decode vs float64 full pass ({case})", maxerr(torch.cat(got, 1), c["exact"]))
    assert err <= 2 * hf_err + 1e-5, (err, hf_err)


@pytest.mark.parametrize("core", COMPILED + [pytest.param(c, marks=pytest.mark.slow) for c in INTERPRETED_ON_CPU])
def test_multi_token_steps_match_hf(fixtures, core):
    """Steps of 3 and 5 new tokens: bottom-right causal inside the chunk, Sq < Sk."""
    cfg, w, _ = fixtures["llama-3.2-1b-synthetic"]
    chunks = [7, 3, 5, 1, 3]
    x = hidden(1, sum(chunks), cfg["hidden_size"], seed=3)
    pos = torch.arange(sum(chunks))[None] + 11  # an offset prompt
    want = hf_decode(Reference(cfg, w), x, pos, chunks)
    got, lengths, _ = impl_decode(CORES[core], x, w, cfg, pos, chunks)
    assert lengths == [7, 10, 15, 16, 19]
    for a, b in zip(got, want, strict=True):
        err = note(f"{core} multi-token decode vs HF", maxerr(a, b))
        assert err <= TOL, err


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("core", COMPILED)
def test_prefill_then_decode_equals_full_pass(cases, case, core):
    """Tolerance: 1e-4, or twice float32's own noise on the input (HF float32 vs float64) where that is larger
    (only SmolLM2 at std 1, see CASES)."""
    c = cases[case]
    x = torch.cat([c["x"], c["x"].flip(1)])  # batch 2
    pos = c["pos"].expand(2, -1)
    full = IMPLEMENTATIONS[core](x, c["w"], config=c["cfg"], position_ids=pos)
    got, _, _ = impl_decode(CORES[core], x, c["w"], c["cfg"], pos, [c["prefill"]] + [1] * STEPS)
    err = note(f"{core} decode vs own full pass ({case})", maxerr(torch.cat(got, 1), full))
    assert err <= max(TOL, 2 * c["hf_noise"]), (err, c["hf_noise"])


@pytest.mark.parametrize("core", COMPILED)
def test_left_padding_decode(fixtures, core):
    """Batch 2, row 0 left-padded by 6: mask [B, T + S_new] at every step; compare the non-padding rows."""
    cfg, w, _ = fixtures["llama-3.2-1b-synthetic"]
    S, pad = PREFILL + 16, 6
    mask = torch.ones(2, S, dtype=torch.long)
    mask[0, :pad] = 0
    pos = positions_from_mask(mask)
    x = hidden(2, S, cfg["hidden_size"], seed=5)
    chunks = [PREFILL] + [1] * 16
    got, lengths, _ = impl_decode(CORES[core], x, w, cfg, pos, chunks, mask)
    got = torch.cat(got, 1)
    assert lengths == list(range(PREFILL, S + 1))
    assert torch.isfinite(got).all()  # padding rows too
    real = mask.bool()
    full = IMPLEMENTATIONS[core](x, w, config=cfg, position_ids=pos, attention_mask=mask)
    err = note(f"{core} padded decode vs own full pass", maxerr(got[real], full[real]))
    assert err <= TOL, err
    want = torch.cat(hf_decode(Reference(cfg, w), x, pos, chunks, mask), 1)
    err = note(f"{core} padded decode vs HF DynamicCache", maxerr(got[real], want[real]))
    assert err <= TOL, err
    # the padded row really is affected by the mask: without it, its real tokens would attend to the padding
    unmasked = IMPLEMENTATIONS[core](x, w, config=cfg, position_ids=pos)
    assert maxerr(unmasked[0, pad:], full[0, pad:]) > 1e-2
    # and row 1 (no padding) equals an unbatched run of that row alone
    alone = IMPLEMENTATIONS[core](x[1:], w, config=cfg, position_ids=pos[1:])
    torch.testing.assert_close(got[1], alone[0], atol=TOL, rtol=0)


def test_cache_grows_and_holds_rotated_keys(fixtures):
    cfg, w, _ = fixtures["smollm2-135m"]
    S = 12
    x = hidden(2, S, cfg["hidden_size"], seed=9)
    pos = torch.arange(S)[None].expand(2, -1) + 100
    cache = decode.KVCache()
    assert cache.length() == 0
    Hkv, d = cfg["num_key_value_heads"], cfg["head_dim"]
    decode.step(CORES["naive"], x[:, :4], w, config=cfg, position_ids=pos[:, :4], cache=cache)
    assert cache.length() == 4
    for t in range(4, S):
        decode.step(CORES["tiled"], x[:, t : t + 1], w, config=cfg, position_ids=pos[:, t : t + 1], cache=cache)
        assert cache.length() == t + 1
        assert cache.k[0].shape == cache.v[0].shape == (2, Hkv, t + 1, d)
    _, k, v = project_qkv(x, w, cfg, pos)  # one pass: keys rotated at their own positions
    torch.testing.assert_close(cache.k[0], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[0], v, atol=1e-5, rtol=1e-5)
    # layers are kept apart
    decode.step(CORES["naive"], x[:, :2], w, config=cfg, position_ids=pos[:, :2], cache=cache, layer=1)
    assert cache.length(1) == 2 and cache.length(0) == S
