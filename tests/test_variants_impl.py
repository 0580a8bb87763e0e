"""The built-in cores (naive, loop, sdpa, tiled) on the kernel contract's three variants (window, softcap, sinks),
forward and backward, against transformers' own functions (tests/variants_ref.py says which, and how they are
called), in float64 and float32, in the manner of FlashAttention's tests/test_flash_attn.py: stacked
parametrizations over awkward sizes.

Cases: causal windows (W - 1, 0) for W = 1, 17, 64, 257 and one past the sequence; lengths W - 1, W, W + 1, 2W + 3;
decoding (Sq = 1) and chunked prefill (Sq < Sk) past the window; padding inside and outside the window; general
(left, right) windows, causal or not, one side unbounded; softcap 50 and 30 on scores x25 / x50 (large enough to bend
the tanh); sinks small, large and negative, with padding (rows that see only the sink) and with Sq < Sk; all three
together; head_dim 64 / 128 / 256; MHA, GQA and MQA.

Tolerances, relative to the reference's own error ("max" is the larger of 1 and the reference tensor's largest
magnitude: inputs are O(1), and some gradients are exactly 0, e.g. dq and dk when each query sees only itself):
- float64, reference float64-faithful (gpt_oss's function: the window-only and sinks cases): |ours - ref| <=
  1e-9 * max|ref| (measured <= 1e-14 relative; a window off by one is >= 1e-3).
- float64, softcap (gemma2's function softmaxes in float32 even for float64 inputs): <= 5e-6 * max|ref| (measured
  <= 1.1e-6 relative: float32 rounding of the probabilities), and every core within 1e-9 * max of naive's float64
  (the cores agree with each other to float64 precision).
- float32: the FlashAttention rule against the float64 reference: |ours - ref64| <= 2 |ref32 - ref64| + floor,
  where ref32 is the same transformers function in float32 (its own error) and the floor is 8 eps32 max|ref64| for
  the output, GRAD_FLOOR max|ref64| for each gradient (below).
- dsinks: the sinks are float32 (the contract), so their gradient is float32 whatever q's dtype: float64 cases allow
  the float32 rounding, 8 eps32 max|dsinks|.
- all three together: no transformers function has both softcap and sinks; the reference is naive.core in float64
  (naive is checked against gemma2's and gpt_oss's functions feature by feature in the cases above).
Rows that see no key: transformers' rows there are a uniform average over masked keys (a 0 / min mask), not zeros,
so they are left out of the output comparison and get a zero upstream gradient; test_rows_that_see_nothing checks
what the contract says for them (out 0; lse -inf, or the sink).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
import variants_ref as ref
from attn_ref import Worst, maxerr
from torch.utils._python_dispatch import TorchDispatchMode

from impl import loop, naive, sdpa, tiled

WORST = Worst("test_variants_impl")
note = WORST.note
EPS32 = torch.finfo(torch.float32).eps
# float32 gradients: FlashAttention-2's D = rowsum(dO * O) and autograd's rowsum(P * dP) round differently, and
# dS = P (dP - D) is a cancellation: measured up to 5.6e-6 (scale 1) where transformers' own error is 2e-6, and
# 3.6e-6 where it is exactly 0 (one key per query: dq = 0). The floor under the 2x rule for gradients (the
# tolerance tests/test_tiled_backward.py measured and uses, 2e-5, is of the same order).
GRAD_FLOOR = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield from WORST.single_threaded()


def tiled_small(q, k, v, **kw):
    return tiled.core(q, k, v, block_q=16, block_k=32, **kw)[0]  # many tiles: every edge is crossed somewhere


CORES = {
    "naive": naive.core,
    "loop": loop.core,
    "sdpa": sdpa.core,
    "tiled": tiled_small,
    "tiled_default": lambda q, k, v, **kw: tiled.core(q, k, v, **kw)[0],
}


@dataclass(frozen=True)
class Case:
    name: str
    Sq: int
    Sk: int
    window: tuple | None = None
    causal: bool = True
    pads: tuple = (0, 0)  # left padding of each batch row's keys (B = len(pads))
    softcap: float = 0.0
    sinks: str | None = None  # "small" | "large" | "negative"
    mult: float = 1.0  # the scores' spread, times ~2
    H: int = 4
    Hkv: int = 2
    d: int = 64

    def __str__(self):
        return self.name


def W(w: int) -> tuple:
    """transformers' sliding_window=w on a causal layer."""
    return (w - 1, 0)


CASES = [
    # causal windows that bind at the lengths used, and one wider than the sequence
    Case("window_1", 300, 300, W(1)),
    Case("window_17", 300, 300, W(17)),
    Case("window_64", 300, 300, W(64), H=4, Hkv=1),
    Case("window_257", 300, 300, W(257), H=4, Hkv=4),
    Case("window_past_seq", 300, 300, W(350)),
    # lengths around the window: W - 1, W, W + 1, 2W + 3
    *(Case(f"window_17_len_{S}", S, S, W(17)) for S in (16, 17, 18, 37)),
    # decoding and chunked prefill past the window (bottom-right aligned queries)
    Case("window_decode", 1, 300, W(64)),
    Case("window_chunk", 37, 300, W(64)),
    # padding inside and outside the window; row 2 has one real key, so early rows see nothing
    Case("window_padding", 100, 100, W(17), pads=(0, 10, 60, 99)),
    # general windows: FlashAttention's (left, right), one side unbounded, causal or not
    Case("window_3_5_noncausal", 70, 70, (3, 5), causal=False),
    Case("window_left_unbounded", 70, 90, (-1, 4), causal=False),
    Case("window_right_unbounded", 70, 90, (7, -1), causal=False, pads=(0, 20)),
    Case("window_5_2_causal", 70, 70, (5, 2)),
    # softcap after the scale, before the mask, on scores large enough to bend
    Case("softcap_50_x25", 128, 128, softcap=50.0, mult=25.0),
    Case("softcap_30_x50", 128, 128, softcap=30.0, mult=50.0, pads=(0, 40)),
    Case("softcap_window", 100, 100, W(17), softcap=50.0, mult=25.0),
    # sinks: one logit per query head in the denominator
    Case("sinks_small", 128, 128, sinks="small"),
    Case("sinks_large", 128, 128, sinks="large", H=4, Hkv=1),
    Case("sinks_negative", 128, 128, sinks="negative", H=4, Hkv=4),
    Case("sinks_padding", 64, 64, sinks="large", pads=(0, 63)),
    Case("sinks_chunk_window", 17, 200, W(64), sinks="small"),
    # all three
    Case("all_three", 100, 100, W(17), softcap=30.0, sinks="large", mult=25.0, pads=(0, 30)),
    # head dims
    Case("window_d128", 90, 90, W(17), d=128),
    Case("sinks_d128", 90, 90, sinks="large", d=128),
    Case("softcap_d256", 64, 64, W(17), softcap=50.0, mult=25.0, d=256),
]
SLOW = {"window_257", "window_past_seq", "softcap_d256"}  # the longest (tiled's small tiles, loop's heads)
PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c for c in CASES]


def sink_values(kind: str | None, H: int) -> torch.Tensor | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(7)
    base = {"small": 0.0, "large": 5.0, "negative": -5.0}[kind]
    spread = 0.1 if kind == "small" else 1.0
    return base + spread * torch.randn(H, generator=g)  # float32, as the contract says


@functools.cache
def inputs(c: Case):
    """q, k, v, dO in float64 (each dtype's inputs are these, rounded), the padding mask, the sinks, keep."""
    g = torch.Generator().manual_seed(zlib.crc32(c.name.encode()))  # stable across runs (str hash is not)
    B = len(c.pads)
    s = 1.5 * c.mult**0.5
    q = torch.randn(B, c.H, c.Sq, c.d, generator=g, dtype=torch.float64) * s
    k = torch.randn(B, c.Hkv, c.Sk, c.d, generator=g, dtype=torch.float64) * s
    v = torch.randn(B, c.Hkv, c.Sk, c.d, generator=g, dtype=torch.float64)
    am = None
    if any(c.pads):
        am = torch.ones(B, c.Sk, dtype=torch.long)
        for b, p in enumerate(c.pads):
            am[b, :p] = 0
    keep = ref.allowed(B, c.Sq, c.Sk, c.window, c.causal, am)  # (B, 1, Sq, Sk), masking_utils
    sees = keep.any(-1, keepdim=True)  # (B, 1, Sq, 1): rows that see a key
    do = torch.randn(B, c.H, c.Sq, c.d, generator=g, dtype=torch.float64) * sees
    return q, k, v, do, am, sink_values(c.sinks, c.H), keep


def kwargs(c: Case, am, sinks):
    return dict(causal=c.causal, window=c.window, softcap=c.softcap, sinks=sinks, attention_mask=am)


def run(fn, c: Case, dtype, transformers: bool):
    """(out, grads) of fn in dtype: grads of sum(out * dO) w.r.t. q, k, v (and sinks), through autograd."""
    q, k, v, do, am, sinks, keep = inputs(c)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    leaves = [q, k, v]
    s = None
    if sinks is not None:  # the reference gets float64 sinks in float64 (gpt_oss's softmax is in the logits' dtype)
        s = (sinks.double() if transformers and dtype == torch.float64 else sinks.clone()).requires_grad_()
        leaves.append(s)
    if transformers:
        out = ref.reference(q, k, v, keep, softcap=c.softcap, sinks=s)
    else:
        out = fn(q, k, v, **kwargs(c, am, s))
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out.detach(), [gr.detach() for gr in grads]


@functools.cache
def references(c: Case):
    """(out, grads) of the reference in float64 and in float32: transformers' functions; all three: naive.core."""
    both = c.softcap and c.sinks is not None
    r64 = run(naive.core, c, torch.float64, transformers=not both)
    r32 = run(naive.core, c, torch.float32, transformers=not both)
    return r64, r32


def seen(t: torch.Tensor, c: Case) -> torch.Tensor:
    """t (B, H, Sq, ...) on the rows that see a key (the others are the contract's own business)."""
    sees = inputs(c)[-1].any(-1)[:, 0]  # (B, Sq)
    return t.transpose(1, 2)[sees]  # (rows, H, ...)


NAMES = ("out", "dq", "dk", "dv", "dsinks")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("core", list(CORES))
@pytest.mark.parametrize("case", PARAMS, ids=str)
def test_core_vs_transformers(case, core, dtype):
    (o64, g64), (o32, g32) = references(case)
    out, grads = run(CORES[core], case, dtype, transformers=False)
    assert out.dtype == dtype and torch.isfinite(out).all()
    pairs = [(seen(out, case), seen(o64, case), seen(o32, case))] + list(zip(grads, g64, g32, strict=True))
    faithful = not case.softcap or case.sinks is not None  # gpt_oss's function (or naive) keeps float64
    for name, (got, want64, want32) in zip(NAMES[: len(pairs)], pairs, strict=True):
        top = max(float(want64.abs().max()), 1.0)  # the tensor's scale; O(1) inputs: at least 1 (dq = 0 at W = 1)
        err = maxerr(got, want64)
        if dtype == torch.float64:
            tol = (1e-9 if faithful else 5e-6) * top
            if name == "dsinks":
                tol = max(tol, 8 * EPS32 * top)  # float32 sinks, float32 gradient
            note(f"{core} f64 {name} / max ({'faithful' if faithful else 'gemma2 f32 softmax'})", err / top)
        else:
            own = maxerr(want32, want64)
            tol = 2 * own + (8 * EPS32 if name == "out" else GRAD_FLOOR) * top
            note(f"{core} f32 {name}: err / (2 own + floor)", err / tol)
        assert err <= tol, (name, err, tol)
    if dtype == torch.float64 and not faithful:  # the cores agree with naive to float64 precision
        n64, ng = run(naive.core, case, torch.float64, transformers=False)
        for name, got, want in zip(NAMES[: len(ng) + 1], [out, *grads], [n64, *ng], strict=True):
            top = max(float(want.abs().max()), 1.0)
            assert maxerr(got, want) <= 1e-9 * top + (8 * EPS32 * top if name == "dsinks" else 0.0), name


# --------------------------------------------------------------------------------------------------------------
# half precision: the FlashAttention rule against the float64 reference


HALF_CASES = [c for c in CASES if c.name in ("window_17", "window_chunk", "softcap_50_x25", "sinks_large",
                                              "sinks_padding", "all_three")]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("core", list(CORES))
@pytest.mark.parametrize("case", HALF_CASES, ids=str)
def test_half_precision(case, core, dtype):
    """|ours - ref64| <= 2 |ref_half - ref64| + eps(dtype) / 8 * max|ref64|, ref_half the same reference function
    in the half dtype (all three: naive in it), forward and every gradient."""
    (o64, g64), _ = references(case)
    both = case.softcap and case.sinks is not None
    oh, gh = run(naive.core, case, dtype, transformers=not both)
    out, grads = run(CORES[core], case, dtype, transformers=False)
    assert out.dtype == dtype
    for name, got, want, own in zip(NAMES[: len(gh) + 1], [seen(out, case), *grads], [seen(o64, case), *g64],
                                    [seen(oh, case), *gh], strict=True):  # fmt: skip
        floor = torch.finfo(dtype).eps / 8 * max(float(want.abs().max()), 1.0)
        err, tol = maxerr(got, want), 2 * maxerr(own, want) + floor
        note(f"{core} {dtype} {name}: err / (2 own + floor)", err / tol)
        assert err <= tol, (name, err, tol)


# --------------------------------------------------------------------------------------------------------------
# what the contract says beyond transformers


@pytest.mark.parametrize("core", list(CORES))
@pytest.mark.parametrize("Sq, Sk", [(77, 77), (1, 77), (20, 77)])
def test_full_window_equals_causal(core, Sq, Sk):
    """(Sk - 1, 0) with causal is plain causal (FlashAttention #1133), and so is any wider left or an unbounded one:
    bit for bit where the same code path runs (sdpa's window goes through a mask, its plain causal through
    is_causal: float rounding apart)."""
    q, k, v = (t.float() for t in inputs(Case("full", Sq, Sk))[:3])
    want = CORES[core](q, k, v)
    for window in ((Sk - 1, 0), (Sk, 0), (Sk + 40, 0), (-1, 0), (None, 0), (Sk - 1, -1)):
        got = CORES[core](q, k, v, window=window)
        if core == "sdpa":
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, want), window
    narrower = CORES[core](q, k, v, window=(Sk - 2, 0))  # control: one key less for the last query
    assert not torch.allclose(narrower[:, :, -1], want[:, :, -1])


@pytest.mark.parametrize("core", list(CORES))
def test_rows_that_see_nothing(core):
    """Padding hides every key of some queries' windows: out = 0 there (not transformers' uniform average), with
    or without sinks; tiled's lse is -inf there without sinks and the head's sink with them."""
    c = Case("empty", 40, 40, W(5), pads=(0, 30))
    q, k, v, _, am, _, keep = inputs(c)
    q, k, v = q.float(), k.float(), v.float()
    sinks = sink_values("large", c.H)
    empty = ~keep.any(-1)[:, 0]  # (B, Sq): batch row 1's first 30 queries see only padding
    assert int(empty.sum()) == 30
    for s in (None, sinks):
        out = CORES[core](q, k, v, window=c.window, attention_mask=am, sinks=s)
        assert torch.isfinite(out).all() and (out.transpose(1, 2)[empty] == 0).all()
    _, lse = tiled.core(q, k, v, window=c.window, attention_mask=am, block_q=16, block_k=32)
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all()
    _, lse = tiled.core(q, k, v, window=c.window, attention_mask=am, sinks=sinks, block_q=16, block_k=32)
    assert torch.equal(lse.transpose(1, 2)[empty], sinks.expand(30, c.H))


@pytest.mark.parametrize("block", [(16, 32), (None, None)], ids=["small", "default"])
def test_tiled_lse_counts_the_sink_once(block):
    """lse = log(exp(sink) + sum_j exp(s_j)), the whole denominator, against float64 logsumexp over the scores and
    the sink as one more column (the contract's definition; transformers' functions return no lse)."""
    c = Case("lse", 50, 90, W(17), pads=(0, 45), sinks="large")
    q, k, v, _, am, sinks, keep = inputs(c)
    _, lse = tiled.core(q.float(), k.float(), v.float(), window=c.window, attention_mask=am, sinks=sinks,
                        block_q=block[0], block_k=block[1])  # fmt: skip
    s = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)) * c.d**-0.5  # (B, H, Sq, Sk) float64
    s = s.masked_fill(~keep, float("-inf"))
    col = sinks.double().view(1, c.H, 1, 1).expand(*s.shape[:3], 1)
    want = torch.logsumexp(torch.cat((s, col), dim=-1), dim=-1)  # (B, H, Sq)
    note("tiled lse with sinks vs float64", maxerr(lse, want))
    torch.testing.assert_close(lse.double(), want, atol=2e-5, rtol=1e-6)


def test_tiled_gradcheck_all_three():
    """torch.autograd.gradcheck of tiled's Function in float64, out and lse, with a window, softcap and sinks
    (q, k, v and the sinks all differentiated): the hand-written backward (the tanh derivative, dsinks) is the
    derivative of the forward. Small blocks, lengths off the grid, GQA, padding with a row that sees only the sink."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    am = torch.ones(2, 13, dtype=torch.long)
    am[1, :9] = 0

    def f(q, k, v, sinks):
        return tiled.core(q, k, v, window=(3, 1), softcap=2.0, sinks=sinks, attention_mask=am, block_q=4, block_k=3)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_tiled_dsinks_is_the_spec_formula():
    """dsinks[h] = -sum over (b, i) of exp(sink_h - lse) (D - dlse), D = rowsum(dO * O): the issue's formula, from
    tiled's own out and lse, equals the gradient its backward returns (float64), with and without an lse gradient."""
    c = Case("dsinks", 40, 60, W(9), pads=(0, 50), sinks="large")
    q, k, v, do, am, sinks, _ = inputs(c)
    s = sinks.double().requires_grad_()
    out, lse = tiled.core(q, k, v, window=c.window, attention_mask=am, sinks=s, block_q=16, block_k=32)
    dl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for dlse in (None, dl):
        outs, grads = ((out,), (do,)) if dlse is None else ((out, lse), (do, dlse))
        (got,) = torch.autograd.grad(outs, s, grads, retain_graph=True)
        D = (do * out).sum(-1) - (0 if dlse is None else dlse)  # (B, H, Sq)
        want = -(torch.exp(s.detach().view(1, -1, 1) - lse.detach()) * D.detach()).sum(dim=(0, 2))  # (H,)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# tiled: a window skips key blocks (linear cost)


class ScoreTiles(TorchDispatchMode):
    """Counts score tiles S_ij = Q_i K_j^T: batched matmuls whose second operand is (n, d, bk) and whose output is
    not d wide, each counted n times (the (batch, KV head) pairs it holds). In the backward dP = dO V^T has the same
    shape: two per tile there."""

    def __init__(self, d: int):
        super().__init__()
        self.d, self.count = d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        b = {torch.ops.aten.bmm.default: 1, torch.ops.aten.baddbmm.default: 2}.get(func)
        if b is not None and args[b].shape[-2] == self.d and out.shape[-1] != self.d:
            self.count += out.shape[0]
        return out


def tiles_visited(S: int, window, d: int = 24, backward: bool = False) -> int:
    q, k, v = (torch.randn(1, h, S, d, generator=torch.Generator().manual_seed(0)) for h in (2, 1, 1))
    if not backward:
        with ScoreTiles(d) as rec:
            tiled.flash_forward(q, k, v, window=window, block_q=64, block_k=64)
        return rec.count
    out, lse = tiled.flash_forward(q, k, v, window=window, block_q=64, block_k=64)
    with ScoreTiles(d) as rec:
        tiled.flash_backward(q, k, v, out, lse, torch.ones_like(out), window=window, block_q=64, block_k=64)
    return rec.count // 2


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_tiled_window_skips_key_blocks(backward):
    """A fixed window W = 100 ((99, 0)): each 64-query block sees at most 64 + 99 keys, 3 key blocks of 64 (from its
    first row's window start), so the blocks visited grow linearly with the sequence: 3 per query block once past
    the start (2 for the first two), against the full causal triangle. The count is of score GEMMs actually run."""
    counts = {S: tiles_visited(S, W(100), backward=backward) for S in (512, 1024, 2048)}
    for S, n in counts.items():  # query block i: keys from max(0, 64 i - 99), through 64 i + 63
        want = sum(-(-(64 * i + 64 - max(0, 64 * i - 99)) // 64) for i in range(S // 64))
        assert n == want, (S, n, want)
    assert counts[2048] - counts[1024] == 2 * (counts[1024] - counts[512])  # linear: +3 per query block
    full = {S: tiles_visited(S, None, backward=backward) for S in (512, 1024)}
    assert full[1024] > 3.5 * full[512]  # control: the counter sees the quadratic triangle (36 -> 136)


# --------------------------------------------------------------------------------------------------------------
# sdpa's fallbacks, and input errors


def test_sdpa_fallbacks_are_reported():
    """sdpa.last_backend (the verdict's backend) names what ran: a torch backend for windows and for sinks (an extra
    zero key, an additive mask), the math backend when the sinks need a gradient (the fused CPU kernels take no
    mask that needs one), naive.core for softcap (torch's function cannot change the scores)."""
    q, k, v = (t.float() for t in inputs(Case("fb", 30, 30))[:3])
    sinks = sink_values("small", 4)
    sdpa.core(q, k, v, window=(4, 0))
    assert sdpa.last_backend in {f"{b.name}{g}" for b in sdpa.ORDER for g in ("", "+gqa")}
    sdpa.core(q, k, v, sinks=sinks)
    assert sdpa.last_backend != sdpa.SOFTCAP_FALLBACK
    out = sdpa.core(q, k, v, sinks=sinks.clone().requires_grad_())
    assert out.requires_grad and (q.device.type != "cpu" or sdpa.last_backend.startswith("MATH"))
    sdpa.core(q, k, v, softcap=30.0, window=(4, 0))
    assert sdpa.last_backend == sdpa.SOFTCAP_FALLBACK == "naive (softcap)"


@pytest.mark.parametrize("core", list(CORES))
def test_bad_variant_keywords_are_clear_errors(core):
    q, k, v = (t.float() for t in inputs(Case("bad", 8, 8))[:3])
    with pytest.raises(ValueError, match="one logit per query head"):
        CORES[core](q, k, v, sinks=torch.zeros(2))  # per KV head: the classic mix-up
    with pytest.raises(ValueError, match="window must be a pair"):
        CORES[core](q, k, v, window=5)
