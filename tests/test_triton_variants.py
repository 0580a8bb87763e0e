"""impl.flash_triton's sliding windows, logit softcap and attention sinks (issue 25's kernel keywords), forward and
backward, in Triton's interpreter, against transformers' own functions called directly:

    window   the boolean / additive masks transformers.masking_utils builds (sdpa_mask, eager_mask) from its mask
             functions: sliding_window_causal_mask_function(W) for a causal (W - 1, 0),
             sliding_window_bidirectional_mask_function(W) for a non-causal (W, W); for an asymmetric window, which
             masking_utils has no function for, and_masks of its bidirectional function and a band overlay of ours
    softcap  gemma2's eager_attention_forward(..., softcap=...) (the window as its additive mask)
    sinks    gpt_oss's eager_attention_forward, which reads module.sinks (the window as its additive mask)

and a float64 truth: the masks above, then scores, cap, sink column and softmax in float64 (`truth`, written here
from torch ops; it is itself checked against gpt_oss's function in float64, which keeps float64 throughout, and
against gemma2's, which softmaxes in float32 whatever the input: to 1e-6). No transformers function has a cap and
sinks at once: `all three` is checked against the truth, each part against transformers.

Tolerances are relative to the reference's own error (printed with -s): float32 |ours - f64| <= 2 |HF f32 - f64|
+ 1e-6 (the floor covers cases where transformers is exact, e.g. one key) and |ours - HF f32| <= 1e-5; bfloat16 by
the FlashAttention rule |ours - f64| <= 2 |HF bf16 - f64| + eps/8 max|f64|. Gradients: dq, dk, dv (and dsinks)
against transformers' functions' autograd and float64 autograd, by the same rules.

Sizes stay small (the interpreter is slow): windows 1, 17 and wider than the sequence; Sq = Sk, Sq = 1 and Sq < Sk
past the window; padding inside and outside the window and a fully padded row; GQA; head_dim 64 and one 128.
The traffic of windowed calls (closed form == count) is in tests/test_triton.py.
"""

from __future__ import annotations

import pytest
import torch
from attn_ref import Worst, maxerr, qkv

pytest.importorskip("triton")

from impl import flash_triton as ft  # noqa: E402

F32_FLOOR = 1e-6
F32_TOL = 1e-5

WORST = Worst("test_triton_variants")
note = WORST.note


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield from WORST.single_threaded()


# --------------------------------------------------------------------------------------------------------------
# references: transformers' masks and eager functions, and the float64 truth


def hf_keep(B, Sq, Sk, *, causal, window, attention_mask=None, additive_dtype=None):
    """transformers.masking_utils' mask for the band (bottom-right aligned: q_offset = Sk - Sq) and padding:
    bool (B, 1, Sq, Sk), or eager_mask's additive one (0 / finfo.min) in additive_dtype."""
    from transformers import masking_utils as mu

    left, right = (-1, -1) if window is None else window
    if causal and right in (0, -1) and left >= 0:
        fn = mu.sliding_window_causal_mask_function(left + 1)  # transformers' sliding_window W = (W - 1, 0)
    elif causal and left == -1:
        fn = mu.causal_mask_function
    elif not causal and left == right and left >= 0:
        fn = mu.sliding_window_bidirectional_mask_function(left)  # |q - kv| <= W
    elif not causal and left == right == -1:
        fn = mu.bidirectional_mask_function
    else:  # masking_utils has no asymmetric window: its base function AND a band overlay of ours
        base = mu.causal_mask_function if causal else mu.bidirectional_mask_function
        fn = mu.and_masks(base, _band_overlay(left, right))
    pad = None if attention_mask is None else attention_mask.bool()
    kw = dict(q_offset=Sk - Sq, mask_function=fn, attention_mask=pad)
    if additive_dtype is not None:
        return mu.eager_mask(B, Sq, Sk, dtype=additive_dtype, **kw)
    return mu.sdpa_mask(B, Sq, Sk, allow_is_causal_skip=False, **kw)


def _band_overlay(left, right):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        ok = kv_idx >= 0
        if left >= 0:
            ok = ok & (kv_idx >= q_idx - left)
        if right >= 0:
            ok = ok & (kv_idx <= q_idx + right)
        return ok

    return inner


def _module(q, k, sinks=None):
    m = torch.nn.Module().eval()  # training = False: no dropout
    m.num_key_value_groups = q.shape[1] // k.shape[1]
    if sinks is not None:
        m.sinks = sinks  # what gpt_oss's function reads (a plain tensor: its gradient reaches the caller's leaf)
    return m


def hf(q, k, v, *, causal=True, window=None, mask=None, softcap=0.0, sinks=None, scale=None):
    """transformers' eager function for the features asked: gpt_oss's with sinks, gemma2's otherwise (its softcap
    None when off). Returns (out (B, H, Sq, d), the module it was given)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    assert not (softcap and sinks is not None), "no transformers function has both"
    B, _, Sq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    bias = hf_keep(B, Sq, k.shape[2], causal=causal, window=window, attention_mask=mask, additive_dtype=q.dtype)
    module = _module(q, k, sinks)
    if sinks is not None:
        out, _ = gpt_oss_eager(module, q, k, v, bias, scaling=scale, dropout=0.0)
    else:
        out, _ = gemma2_eager(module, q, k, v, bias, dropout=0.0, scaling=scale, softcap=softcap or None)
    return out.transpose(1, 2), module


def truth(q, k, v, keep, *, softcap=0.0, sinks=None, scale=None, dtype=torch.float64):
    """float64 (out, lse), differentiable everywhere: masked scores are -1e30 (exp gives exactly 0; no -inf
    reaches autograd), the sink a last logit column with no value, rows that see nothing (and no sink) out 0 and
    lse -inf. dtype=float32: the same in float32, to measure what float32 scores cost lse (transformers returns
    none to compare)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, -1e30)
    seen = keep.any(-1)  # (B|1, 1, Sq)
    full = s
    if sinks is not None:
        B, H, Sq, _ = s.shape
        full = torch.cat([s, sinks.to(dtype)[None, :, None, None].expand(B, H, Sq, 1)], -1)
        seen = seen | True
    lse = torch.logsumexp(full, -1)
    out = torch.exp(s - lse[..., None]) * seen[..., None] @ v
    return out, torch.where(seen, lse, float("-inf"))


def padding_mask(Sk, pads):
    """[B, Sk]: row b has pads[b] leading zeros (pads[b] = Sk: a fully padded row)."""
    m = torch.ones(len(pads), Sk, dtype=torch.long)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


def test_truth_is_transformers_in_float64():
    """The float64 truth against gpt_oss's eager function run in float64 (faithful: it softmaxes in the input's
    dtype) with sinks and a window, and gemma2's with a cap (its softmax is float32 whatever the input)."""
    q, k, v = qkv(2, 4, 2, 23, 40, 32, seed=1, scale=3.0)
    mask = padding_mask(40, [0, 30])
    keep = hf_keep(2, 23, 40, causal=True, window=(16, 0), attention_mask=mask)
    sinks = torch.tensor([0.5, -2.0, 3.0, 0.0])
    want, _ = truth(q, k, v, keep, sinks=sinks)
    got, _ = hf(q.double(), k.double(), v.double(), window=(16, 0), mask=mask, sinks=sinks.double())
    assert maxerr(got, want) < 1e-12
    want, _ = truth(q, k, v, keep, softcap=20.0)
    got, _ = hf(q.double(), k.double(), v.double(), window=(16, 0), mask=mask, softcap=20.0)
    seen = keep.any(-1)[..., None].expand_as(want)
    assert maxerr(got[seen], want[seen]) < 1e-6


# --------------------------------------------------------------------------------------------------------------
# forward, float32: a case table per feature; each case against transformers and the float64 truth


def check_forward(q, k, v, *, causal=True, window=None, mask=None, softcap=0.0, sinks=None, blocks=(16, 16), tag=""):
    """ours vs the float64 truth and vs transformers' function (when one has the features), float32 rule."""
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks)
    out, lse = ft.core(q, k, v, attention_mask=mask, block_m=blocks[0], block_n=blocks[1], **kw)
    keep = hf_keep(B, Sq, Sk, causal=causal, window=window, attention_mask=mask)
    ref, ref_lse = truth(q, k, v, keep, softcap=softcap, sinks=sinks)
    seen = torch.isfinite(ref_lse)  # rows that see a key, or have a sink
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), ~seen) and (out[~seen] == 0).all()
    e = note(f"triton vs float64 ({tag})", maxerr(out, ref))
    e_lse = note(f"lse vs float64 ({tag})", maxerr(lse[seen], ref_lse[seen]))
    e_lse32 = note(f"float32 torch lse vs float64 ({tag})",
                   maxerr(truth(q, k, v, keep, softcap=softcap, sinks=sinks, dtype=torch.float32)[1][seen],
                          ref_lse[seen]))  # fmt: skip
    assert e_lse <= 2 * e_lse32 + F32_FLOOR, (e_lse, e_lse32)
    if softcap and sinks is not None:  # no transformers function has both: the truth's own float32 error
        e_32 = note(f"float32 torch vs float64 ({tag})", maxerr(
            truth(q, k, v, keep, softcap=softcap, sinks=sinks, dtype=torch.float32)[0], ref))  # fmt: skip
        assert e <= 2 * e_32 + F32_FLOOR, (e, e_32)
        return out, lse
    theirs, _ = hf(q, k, v, **kw, mask=mask)
    e_hf = note(f"HF eager vs float64 ({tag})", maxerr(theirs[seen], ref[seen]))  # gemma2: its empty rows average v
    note(f"triton vs HF eager ({tag})", maxerr(out[seen], theirs[seen]))
    assert e <= 2 * e_hf + F32_FLOOR, (e, e_hf)
    return out, lse


def case_id(c) -> str:
    return c[0]


WINDOWS = [  # id, B, H, Hkv, Sq, Sk, d, causal, window, pads (leading padded keys per batch row), blocks
    ("w1", 2, 4, 2, 40, 40, 64, True, (0, 0), [0, 13], (16, 16)),  # the diagonal only
    ("w17-padding-in-and-out", 2, 4, 4, 50, 50, 64, True, (16, 0), [0, 20], (16, 32)),
    ("w5-fully-padded-windows", 2, 4, 2, 40, 40, 64, True, (4, 0), [0, 20], (16, 16)),  # rows 0..19: no key
    ("w-past-S", 1, 4, 2, 40, 40, 64, True, (100, 0), None, (16, 32)),
    ("decode-past-w17", 2, 4, 2, 1, 70, 64, True, (16, 0), [0, 60], (16, 16)),
    ("chunk-past-w17", 1, 4, 2, 20, 70, 64, True, (16, 0), None, (16, 16)),
    ("bidirectional-8", 1, 4, 2, 45, 45, 64, False, (8, 8), [5], (16, 16)),
    ("asymmetric-5-2", 1, 4, 1, 30, 45, 64, False, (5, 2), None, (16, 16)),
    ("w17-d128", 1, 2, 1, 33, 33, 128, True, (16, 0), None, (16, 16)),
]


@pytest.mark.parametrize("case", WINDOWS, ids=case_id)
def test_window_vs_masking_utils(case):
    name, B, H, Hkv, Sq, Sk, d, causal, window, pads, blocks = case
    q, k, v = qkv(B, H, Hkv, Sq, Sk, d, seed=Sq + Sk + d)
    mask = None if pads is None else padding_mask(Sk, pads)
    check_forward(q, k, v, causal=causal, window=window, mask=mask, blocks=blocks, tag="window")


SOFTCAPS = [  # id, Sq, Sk, (H, Hkv), causal, window, pads, softcap, input scale (scores' spread ~ scale^2)
    ("cap50-x25", 37, 37, (4, 2), True, None, [0, 10], 50.0, 25.0),  # bent flat: scores ~ 600 against 50
    ("cap30-x50-w17-chunk", 20, 45, (4, 2), True, (16, 0), None, 30.0, 50.0),
    ("cap50-x1-decode", 1, 40, (4, 1), True, None, None, 50.0, 1.0),  # hardly bent: tanh's series branch
    ("cap30-x5-bidirectional-8", 33, 33, (4, 4), False, (8, 8), [3, 0], 30.0, 5.0),
]


@pytest.mark.parametrize("case", SOFTCAPS, ids=case_id)
def test_softcap_vs_gemma2(case):
    name, Sq, Sk, (H, Hkv), causal, window, pads, cap, scale = case
    q, k, v = qkv(2 if pads else 1, H, Hkv, Sq, Sk, 64, seed=Sq + Sk, scale=scale)
    mask = None if pads is None else padding_mask(Sk, pads)
    check_forward(q, k, v, causal=causal, window=window, mask=mask, softcap=cap, tag=f"softcap x{scale:g}")


SINKS = [  # id, Sq, Sk, causal, window, pads, sinks (4 query heads), input scale
    ("small", 37, 37, True, None, [0, 37], [0.1, -0.05, 0.02, 0.0], 1.0),  # a fully padded row: out 0, lse sink
    ("large-w17", 40, 40, True, (16, 0), [0, 10], [8.0, 6.0, 9.0, 7.5], 1.0),  # the sink takes most of the mass
    ("negative-decode", 1, 50, True, (16, 0), None, [-6.0, -3.0, -8.0, -5.0], 3.0),
    ("mixed-chunk-w17", 20, 45, True, (16, 0), [0, 30], [-2.0, 0.5, 3.0, -0.5], 3.0),
    ("bidirectional", 30, 30, False, None, None, [1.0, -1.0, 2.0, 0.0], 2.0),
]


@pytest.mark.parametrize("case", SINKS, ids=case_id)
def test_sinks_vs_gpt_oss(case):
    """gpt_oss's eager function gives rows that see no key out 0 (its sink takes all the mass): compared too."""
    name, Sq, Sk, causal, window, pads, sinks, scale = case
    q, k, v = qkv(2 if pads else 1, 4, 2, Sq, Sk, 64, seed=Sq * Sk, scale=scale)
    mask = None if pads is None else padding_mask(Sk, pads)
    sinks = torch.tensor(sinks)
    out, lse = check_forward(q, k, v, causal=causal, window=window, mask=mask, sinks=sinks, tag="sinks")
    theirs, _ = hf(q, k, v, causal=causal, window=window, mask=mask, sinks=sinks)
    torch.testing.assert_close(out, theirs, atol=F32_TOL, rtol=F32_TOL)
    keep = hf_keep(out.shape[0], Sq, Sk, causal=causal, window=window, attention_mask=mask)
    empty = ~keep.any(-1).expand(lse.shape)  # rows that see no key: lse is the sink
    assert torch.equal(lse[empty], sinks[None, :, None].expand(lse.shape)[empty])


@pytest.mark.parametrize("Sq,Sk,d", [(33, 33, 64), (1, 60, 128)], ids=["33x33-d64", "decode-d128"])
def test_all_three_vs_truth(Sq, Sk, d):
    """A window, a cap and sinks at once (no transformers function has cap and sinks together: the float64 truth,
    whose parts are transformers' own, see test_truth_is_transformers_in_float64)."""
    q, k, v = qkv(2, 4, 2, Sq, Sk, d, seed=d, scale=5.0)
    mask = padding_mask(Sk, [0, Sk // 2])
    sinks = torch.tensor([1.0, -2.0, 4.0, 0.0])
    check_forward(q, k, v, window=(16, 0), mask=mask, softcap=30.0, sinks=sinks, tag="all three")


# --------------------------------------------------------------------------------------------------------------
# backward, float32: dq, dk, dv (and dsinks) against transformers' functions' autograd and float64 autograd


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fn(*leaves).backward()
    return [t.grad for t in leaves]


GRADS = [  # id, Sq, Sk, (H, Hkv), causal, window, pads, softcap, sinks?, input scale
    ("w17-cap30-padded", 37, 37, (4, 2), True, (16, 0), [0, 20], 30.0, False, 3.0),
    ("asymmetric-5-2", 30, 45, (4, 1), False, (5, 2), None, 0.0, False, 1.0),
    ("sinks-chunk-w8", 20, 45, (4, 2), True, (8, 0), [0, 30], 0.0, True, 2.0),
    ("sinks-decode-w1", 1, 40, (4, 4), True, (0, 0), None, 0.0, True, 1.0),
]


@pytest.mark.parametrize("case", GRADS, ids=case_id)
def test_gradients_vs_transformers(case):
    """Gradients of sum(out * g) (g zero on rows that see no key: gemma2's rows there average v) against
    transformers' function under autograd (f32) and the float64 truth's: |ours - f64| <= 2 |HF - f64| + floor."""
    name, Sq, Sk, (H, Hkv), causal, window, pads, cap, with_sinks, scale = case
    B = 2 if pads else 1
    q, k, v = qkv(B, H, Hkv, Sq, Sk, 64, seed=Sq + Sk + H, scale=scale)
    mask = None if pads is None else padding_mask(Sk, pads)
    sinks = torch.linspace(-1.0, 2.0, H) if with_sinks else None
    keep = hf_keep(B, Sq, Sk, causal=causal, window=window, attention_mask=mask)
    go = torch.randn(B, H, Sq, 64, generator=torch.Generator().manual_seed(3)) * keep.any(-1)[..., None]
    kw = dict(causal=causal, window=window, softcap=cap)
    tensors = (q, k, v) + ((sinks,) if with_sinks else ())

    def ours(q, k, v, s=None):
        return (ft.core(q, k, v, attention_mask=mask, sinks=s, block_m=16, block_n=16, **kw)[0] * go).sum()

    def theirs(q, k, v, s=None):
        return (hf(q, k, v, mask=mask, sinks=s, **kw)[0] * go).sum()

    def exact(q, k, v, s=None):
        return (truth(q, k, v, keep, softcap=cap, sinks=s)[0] * go.double()).sum()

    got, hf_g = grads(ours, *tensors), grads(theirs, *tensors)
    want = grads(exact, *(t.double() for t in tensors))
    for n, a, h, w in zip(["q", "k", "v", "sinks"][: len(got)], got, hf_g, want, strict=True):
        assert a.dtype == torch.float32 and not torch.isnan(a).any()
        e, e_hf = note(f"d{n} vs float64", maxerr(a, w)), note(f"d{n} HF eager vs float64", maxerr(h, w))
        note(f"d{n} vs HF eager", maxerr(a, h))
        assert e <= 2 * e_hf + F32_FLOOR * max(1.0, float(w.abs().max())), (n, e, e_hf)


def test_gradients_all_three_through_out_and_lse():
    """A window, a cap and sinks together, the loss through out and lse (lse's gradient reaches q, k and the
    sinks: d lse / d sink = P_sink), against the float64 truth's autograd; a row with a fully padded window."""
    B, H, Hkv, Sq, Sk = 2, 4, 2, 24, 40
    q, k, v = qkv(B, H, Hkv, Sq, Sk, 64, seed=9, scale=4.0)
    mask = padding_mask(Sk, [0, 30])  # batch row 1: queries before position 30 see no key but the sink
    sinks = torch.tensor([0.5, -1.0, 3.0, -4.0])
    keep = hf_keep(B, Sq, Sk, causal=True, window=(8, 0), attention_mask=mask)
    g = torch.Generator().manual_seed(4)
    go, gl = torch.randn(B, H, Sq, 64, generator=g), torch.randn(B, H, Sq, generator=g)

    def ours(q, k, v, s):
        out, lse = ft.core(q, k, v, attention_mask=mask, window=(8, 0), softcap=30.0, sinks=s, block_m=16,
                           block_n=16)  # fmt: skip
        return (out * go).sum() + (lse * gl).sum()

    def loss(dtype):
        def f(q, k, v, s):
            out, lse = truth(q, k, v, keep, softcap=30.0, sinks=s, dtype=dtype)
            return (out * go.to(dtype)).sum() + (lse * gl.to(dtype)).sum()

        return f

    got = grads(ours, q, k, v, sinks)
    want = grads(loss(torch.float64), *(t.double() for t in (q, k, v, sinks)))
    f32 = grads(loss(torch.float32), q, k, v, sinks)
    for n, a, w, t in zip("qkvs", got, want, f32, strict=True):
        e, e_32 = note(f"d{n} all three vs float64", maxerr(a, w)), maxerr(t, w)
        note(f"d{n} all three float32 torch vs float64", e_32)
        assert e <= 2 * e_32 + F32_FLOOR * max(1.0, float(w.abs().max())), (n, e, e_32)
    assert got[3].abs().min() > 1e-3  # every sink's gradient is really there


# --------------------------------------------------------------------------------------------------------------
# bfloat16: the FlashAttention rule against transformers' functions in bfloat16


def fa_rule(ours, theirs, ref, what):
    """|ours - f64| <= 2 |theirs - f64| + eps(bf16)/8 max|f64|: returns the two errors."""
    e = note(f"{what} bf16 vs float64", maxerr(ours, ref))
    e_hf = note(f"{what} HF bf16 vs float64", maxerr(theirs, ref))
    assert e <= 2 * e_hf + torch.finfo(torch.bfloat16).eps / 8 * float(ref.abs().max()), (what, e, e_hf)
    return e, e_hf


@pytest.mark.parametrize("feature", ["softcap", "sinks"])
def test_bfloat16_window_with_softcap_or_sinks(feature):
    """bfloat16 q, k, v (sinks stay float32): a window of 17 with gemma2's cap (x5 inputs) or gpt_oss's sinks, padding,
    GQA; out in bfloat16; the float64 truth from the same rounded inputs."""
    B, H, Hkv, S = 2, 4, 2, 40
    q, k, v = qkv(B, H, Hkv, S, S, 64, seed=11, scale=5.0 if feature == "softcap" else 1.0, dtype=torch.bfloat16)
    mask = padding_mask(S, [0, 12])
    kw = dict(window=(16, 0), softcap=30.0) if feature == "softcap" else dict(window=(16, 0))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0]) if feature == "sinks" else None
    out, lse = ft.core(q, k, v, attention_mask=mask, sinks=sinks, block_m=16, block_n=16, **kw)
    keep = hf_keep(B, S, S, causal=True, window=(16, 0), attention_mask=mask)
    ref, ref_lse = truth(q, k, v, keep, softcap=kw.get("softcap", 0.0), sinks=sinks)
    theirs, _ = hf(q, k, v, mask=mask, sinks=sinks, **kw)
    seen = torch.isfinite(ref_lse)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any() and (out[~seen] == 0).all()
    fa_rule(out[seen], theirs[seen], ref[seen], feature)
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], atol=1e-4, rtol=1e-5)  # float32 scores


@pytest.mark.slow
def test_bfloat16_gradients_window_softcap():
    """dq, dk, dv in bfloat16 with a window and gemma2's cap, by the FlashAttention rule against gemma2's autograd."""
    B, H, Hkv, S = 2, 4, 2, 37
    q, k, v = qkv(B, H, Hkv, S, S, 64, seed=12, scale=3.0, dtype=torch.bfloat16)
    mask = padding_mask(S, [0, 15])
    keep = hf_keep(B, S, S, causal=True, window=(16, 0), attention_mask=mask)
    go = torch.randn(B, H, S, 64, generator=torch.Generator().manual_seed(13)) * keep.any(-1)[..., None]
    kw = dict(window=(16, 0), softcap=30.0)

    def ours(q, k, v):
        return (ft.core(q, k, v, attention_mask=mask, block_m=16, block_n=16, **kw)[0].float() * go).sum()

    got = grads(ours, q, k, v)
    theirs = grads(lambda q, k, v: (hf(q, k, v, mask=mask, **kw)[0].float() * go).sum(), q, k, v)
    want = grads(lambda q, k, v: (truth(q, k, v, keep, softcap=30.0)[0] * go.double()).sum(),
                 *(t.double() for t in (q, k, v)))  # fmt: skip
    for n, a, h, w in zip("qkv", got, theirs, want, strict=True):
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any()
        fa_rule(a, h, w, f"d{n}")


# --------------------------------------------------------------------------------------------------------------
# equalities the keywords promise, exactly


def test_full_window_is_causal_bit_for_bit():
    """(S - 1, 0), a window past the sequence and (-1, 0) are plain causal; (L, 5) under causal is (L, 0); (-1, -1)
    non-causal is full attention. Same tiles, same sums: equal bit for bit, forward and backward."""
    S = 40
    q, k, v = qkv(1, 4, 2, S, S, 32, seed=2)
    go = torch.randn(1, 4, S, 32, generator=torch.Generator().manual_seed(5))

    def run(backward=False, **kw):
        leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
        out, lse = ft.core(*leaves, block_m=16, block_n=16, **kw)
        if backward:
            (out * go).sum().backward()
        return [out.detach(), lse.detach(), *(t.grad for t in leaves if backward)]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    causal = run()
    for window in ((S + 50, 0), (-1, 0), (None, 0), (S - 1, 5), (2**40, 0)):  # 2^40: past int32, clamped
        assert same(run(window=window), causal), window
    assert same(run(True, window=(S - 1, 0)), run(True))
    assert same(run(True, window=(7, 5)), run(True, window=(7, 0)))
    full = run(causal=False)
    assert same(run(causal=False, window=(-1, -1)), full) and not torch.equal(full[0], causal[0])
    assert same(run(causal=False, window=(3, 2**31 - 1)), run(causal=False, window=(3, -1)))  # int32: clamped


def test_sinks_of_minus_inf_are_no_sinks():
    """Every sink at -inf: out and lse bit for bit those without sinks (the same starting state), dsinks 0."""
    q, k, v = qkv(1, 4, 2, 30, 30, 32, seed=6)
    mask = padding_mask(30, [5])
    go = torch.randn(1, 4, 30, 32, generator=torch.Generator().manual_seed(7))
    plain = ft.core(q, k, v, attention_mask=mask, window=(8, 0), block_m=16, block_n=16)
    sinks = torch.full((4,), float("-inf"), requires_grad=True)
    qq = q.clone().requires_grad_()
    out, lse = ft.core(qq, k, v, attention_mask=mask, window=(8, 0), sinks=sinks, block_m=16, block_n=16)
    assert torch.equal(out, plain[0]) and torch.equal(lse, plain[1])
    (out * go).sum().backward()
    assert torch.equal(sinks.grad, torch.zeros(4)) and not torch.isnan(qq.grad).any()


def test_variant_input_errors():
    q, k, v = qkv(1, 4, 2, 8, 8, 32)
    for bad in ((3,), (1, 2, 3), (-2, 0), (1.5, 0), "(3, 0)", (True, 0)):
        with pytest.raises(ValueError, match="window"):
            ft.core(q, k, v, window=bad)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            ft.core(q, k, v, softcap=bad)
    for bad in (torch.zeros(2), torch.zeros(1, 4), [0.0] * 4):
        with pytest.raises(ValueError, match="sinks"):
            ft.core(q, k, v, sinks=bad)
