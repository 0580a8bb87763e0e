"""impl.tiled's backward (FlashAttention-2: flash_backward behind the FlashAttention autograd Function) against
transformers' eager attention run through autograd.

Covers: torch.autograd.gradcheck in float64 of both outputs (out and lse) on small shapes: causal and not, MHA /
GQA g=2 / MQA, Sq < Sk (bottom-right causal), left padding with a fully padded row, blocks smaller than the
sequence, lengths off the block grid; dq, dk, dv vs transformers' eager_attention_forward through autograd in float32
and float64 (lengths 1, 17, 113, 257, 1000 x GQA ratios x left padding x block sizes); bf16/fp16 against float64 by
the FlashAttention rule; fully masked rows (zero gradient, never NaN); only some inputs needing a gradient; the lse
gradient; causal tile skipping in the backward; tiled.attention's gradients (x and the four weights) vs transformers'
LlamaAttention; the memory proof (no S x S tensor in the backward at seq 4096 on the Llama-3.2-1B shapes); the
no-grad forward is flash_forward's, bit for bit.

The reference is transformers' eager attention (float64 inputs where a float64 gradient is wanted). Its loss is
sum(out * g) with a fixed seeded g, i.e. autograd.grad(out, (q, k, v), g). Query rows that see no key (left padding)
get g = 0: transformers' rows there are a uniform average over masked keys, not zeros, so only g = 0 makes both
sides' gradients comparable (both are then exactly the gradient of the rows that see keys).

Run with `-s` to see the largest errors measured per comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from attn_ref import SMALL, TensorRecorder, Worst, allowed_mask, left_padding_mask, maxerr, quadratic
from attn_ref import qkv as _qkv
from conftest import random_weights
from torch.utils._python_dispatch import TorchDispatchMode

from impl import tiled

# float32 gradients (O(1..10) here) vs transformers' float32: measured <= 6.7e-6 (transformers' own float32 error vs
# float64 is <= 5.5e-6 on the same cases, tiled's <= 5.3e-6).
F32_TOL = 2e-5
# float64 vs transformers' float64: its softmax runs in float32 whatever the input dtype (eager_attention_forward's
# softmax(dtype=float32)), so its float64 gradients carry float32 error: measured <= 2.9e-6. (gradcheck proves tiled's
# float64 gradients exact.)
F64_TOL = 1e-5
# tiled.attention's gradients (x and the weights) vs LlamaAttention's in float32, relative to max |gradient|
LAYER_REL_TOL = 2e-6

BLOCKS = [(16, 48), (7, 13), (128, 256)]  # last: the defaults, larger than most sequences here
LENGTHS = [1, 17, 113, 257, 1000]
GQA = [(4, 4), (4, 2), (4, 1)]  # (H, Hkv): MHA, g=2, MQA


WORST = Worst("test_tiled_backward")
note = WORST.note


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield from WORST.single_threaded()


def qkv(B, H, Hkv, Sq, Sk, d, seed=0, dtype=torch.float32):
    """Scores with std ~2 (a non-uniform softmax), values ~1."""
    return _qkv(B, H, Hkv, Sq, Sk, d, seed=seed, scale=1.5, dtype=dtype)


def upstream(q, attention_mask=None, causal=True, Sk=None, seed=1):
    """The fixed seeded g of loss = sum(out * g), (B, H, Sq, d), zero on query rows that see no key."""
    B, H, Sq, d = q.shape
    sees = allowed_mask(Sq, Sk or Sq, attention_mask, causal).any(-1)  # (B|1, 1, Sq)
    g = torch.randn(B, H, Sq, d, generator=torch.Generator().manual_seed(seed))
    return (g * sees[..., None]).to(q.dtype)


def hf_core(q, k, v, attention_mask=None, causal=True):
    """transformers' eager_attention_forward: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (B, H, Sq, d).

    An explicit additive mask (eager with attention_mask=None is NOT causal), 0 / finfo.min as transformers builds
    it. For float64 inputs the mask value is float32's min: the softmax runs in float32, where float64's min is -inf
    and a fully masked row would give NaN.
    """
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    module.training = False
    keep = allowed_mask(q.shape[2], k.shape[2], attention_mask, causal)  # (B|1, 1, Sq, Sk)
    low = torch.finfo(torch.float32 if q.dtype == torch.float64 else q.dtype).min
    bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, low)
    out, _ = eager_attention_forward(module, q, k, v, bias, scaling=q.shape[-1] ** -0.5)  # (B, Sq, H, d)
    return out.transpose(1, 2)  # (B, H, Sq, d)


def tiled_core(attention_mask=None, causal=True, block=(tiled.BLOCK_Q, tiled.BLOCK_K)):
    def f(q, k, v):
        return tiled.core(q, k, v, attention_mask=attention_mask, causal=causal, block_q=block[0], block_k=block[1])[0]

    return f


def grads(fn, q, k, v, g):
    """(dq, dk, dv) of sum(fn(q, k, v) * g), through autograd, on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), g.to(out.dtype))


# --------------------------------------------------------------------------------------------------------------
# gradcheck in float64: out and lse


GRADCHECK = [
    # (B, H, Hkv, Sq, Sk, d, causal, pads, block)
    (1, 2, 2, 9, 9, 4, True, None, (4, 3)),  # MHA, blocks smaller than the sequence, 9 off both grids
    (2, 4, 2, 7, 7, 4, True, None, (3, 5)),  # GQA g=2
    (1, 4, 1, 11, 11, 3, True, None, (4, 4)),  # MQA, d=3
    (1, 4, 2, 5, 13, 4, True, None, (2, 4)),  # Sq < Sk: bottom-right causal
    (2, 4, 2, 8, 8, 2, True, [3, 8], (3, 3)),  # left padding; row 1 fully padded (every query sees nothing)
    (2, 2, 1, 6, 10, 3, True, [4, 10], (4, 3)),  # Sq < Sk with padding, fully padded row, MQA
    (1, 4, 2, 6, 9, 4, False, None, (4, 4)),  # non-causal, Sq < Sk
    (2, 2, 2, 7, 7, 3, False, [2, 7], (3, 2)),  # non-causal with padding, a fully padded row
    (1, 2, 1, 1, 1, 4, True, None, (128, 256)),  # one token, default blocks
]


def case_id(c):
    B, H, Hkv, Sq, Sk, d, causal, pads, block = c
    pad = "-".join(map(str, pads)) if pads else "none"
    return f"B{B}H{H}kv{Hkv}-q{Sq}k{Sk}-{'causal' if causal else 'full'}-pad{pad}-{block[0]}x{block[1]}"


FAST_GRADCHECK = (0, 4, 8)  # MHA off-grid, padding with a fully padded row, one token; the rest: slow tier


@pytest.mark.parametrize("case", [c if i in FAST_GRADCHECK else pytest.param(c, marks=pytest.mark.slow)
                                  for i, c in enumerate(GRADCHECK)], ids=case_id)  # fmt: skip
def test_gradcheck_float64(case):
    B, H, Hkv, Sq, Sk, d, causal, pads, block = case
    q, k, v = qkv(B, H, Hkv, Sq, Sk, d, seed=Sq * Sk, dtype=torch.float64)
    mask = left_padding_mask(Sk, pads) if pads else None

    def f(q, k, v):
        out, lse = tiled.core(q, k, v, causal=causal, attention_mask=mask, block_q=block[0], block_k=block[1])
        # rows that see no key have lse = -inf for every input (finite differences would give inf - inf)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    if pads and pads[-1] == Sk:  # the fully padded row: zero gradient
        dq, dk, dv = torch.autograd.grad(f(*inputs)[0].sum(), inputs)
        assert (dq[-1] == 0).all() and (dk[-1] == 0).all() and (dv[-1] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# dq, dk, dv vs transformers' eager attention


def compare(q, k, v, mask, *, block, causal=True, tol, tag):
    g = upstream(q, mask, causal, k.shape[2])
    want = grads(lambda q, k, v: hf_core(q, k, v, mask, causal), q, k, v, g)
    got = grads(tiled_core(mask, causal, block), q, k, v, g)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = note(f"tiled {name} vs HF ({tag})", maxerr(a, b))
        assert err <= tol, (name, err)


@pytest.mark.parametrize(
    "block, S",
    [
        pytest.param(b, S, id=f"{b[0]}x{b[1]}-{S}")
        for b in BLOCKS
        for S in LENGTHS
        if not (b == (7, 13) and S == 1000)  # 143 x 77 tiles of Python: 1000 runs with 16 x 48 and the defaults
    ],
)
def test_grads_vs_transformers_float32(block, S):
    """Batch 2, row 1 left-padded by a third (S=1: no padding), every GQA ratio."""
    mask = left_padding_mask(S, [0, S // 3]) if S > 1 else None
    for i, (H, Hkv) in enumerate(GQA):
        q, k, v = qkv(2, H, Hkv, S, S, 32, seed=10 * S + i)
        compare(q, k, v, mask, block=block, tol=F32_TOL, tag="f32")


@pytest.mark.slow
@pytest.mark.parametrize("S", LENGTHS)
def test_grads_vs_transformers_float64(S):
    mask = left_padding_mask(S, [0, S // 3]) if S > 1 else None
    for i, (H, Hkv) in enumerate(GQA):
        q, k, v = qkv(2, H, Hkv, S, S, 32, seed=10 * S + i, dtype=torch.float64)
        compare(q, k, v, mask, block=(16, 48), tol=F64_TOL, tag="f64")


@pytest.mark.parametrize("Sq", [1, 40, 100])
def test_grads_fewer_queries_than_keys_and_non_causal(Sq):
    """Sk=137 keys: bottom-right causal and non-causal, with left padding (row 1 padded past the first queries)."""
    mask = left_padding_mask(137, [0, 60])
    for i, (H, Hkv) in enumerate(GQA):
        q, k, v = qkv(2, H, Hkv, Sq, 137, 32, seed=Sq + i)
        for causal in (True, False):
            compare(q, k, v, mask, block=(16, 48), causal=causal, tol=F32_TOL, tag="f32, Sq < Sk")


# --------------------------------------------------------------------------------------------------------------
# half precision: the FlashAttention rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 17, 113, 257])
def test_half_precision_rule(S, dtype):
    """|tiled_grad - grad64| <= 2 |hf_grad - grad64| + floor (max abs over the whole tensor), tiled and transformers
    both run in `dtype` on the same (already rounded) inputs, grad64 is transformers' in float64 (its float32 softmax
    error, ~1e-6, is far below these). floor = eps(dtype)/2 * max|grad64| (one rounding at the gradient's scale) +
    1e-5 (the float32 internals: at S=1 dq = dk = 0 exactly, tiled gives ~1e-6). Measured ratio tiled/HF error
    <= 2.05 (bf16, S=17, dk, within the floor), mostly 0.4-1.2; with dP rounded to the half dtype before dP - D
    (a half-precision bmm) it was up to 3.4 and failed."""
    mask = left_padding_mask(S, [0, S // 2]) if S > 1 else None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    for i, (H, Hkv) in enumerate(GQA):
        q, k, v = qkv(2, H, Hkv, S, S, 32, seed=S + i, dtype=dtype)
        g = upstream(q, mask)
        exact = grads(lambda q, k, v: hf_core(q, k, v, mask), q.double(), k.double(), v.double(), g.double())
        hf = grads(lambda q, k, v: hf_core(q, k, v, mask), q, k, v, g)
        for block in [(16, 48), (128, 256)]:
            got = grads(tiled_core(mask, block=block), q, k, v, g)
            for gname, t, h, x in zip(("dq", "dk", "dv"), got, hf, exact, strict=True):
                assert t.dtype == dtype and torch.isfinite(t).all()
                e_tiled, e_hf = maxerr(t, x), maxerr(h, x)
                floor = torch.finfo(dtype).eps / 2 * float(x.abs().max()) + 1e-5
                note(f"tiled {gname} {name} vs float64", e_tiled)
                note(f"HF {gname} {name} vs float64", e_hf)
                if e_hf > floor:
                    note(f"tiled/HF error ratio ({name})", e_tiled / e_hf)
                assert e_tiled <= 2 * e_hf + floor, (gname, e_tiled, e_hf, floor)


# --------------------------------------------------------------------------------------------------------------
# fully masked rows, partial requires_grad, the lse gradient, tile skipping


def test_fully_masked_rows_zero_gradient_never_nan():
    """Row 0 unpadded, row 1 padded past the first 45 queries' keys, row 2 entirely padding; g nonzero everywhere
    (even on rows that see nothing): gradients finite, exactly 0 for those rows and for padded keys."""
    S = 80
    mask = torch.stack([torch.ones(S), (torch.arange(S) >= 45).float(), torch.zeros(S)]).long()
    q, k, v = qkv(3, 4, 2, S, S, 16, seed=3)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
    dq, dk, dv = grads(tiled_core(mask, block=(16, 32)), q, k, v, g)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[2] == 0).all() and (dq[1, :, :45] == 0).all()
    assert (dk[2] == 0).all() and (dv[2] == 0).all()
    assert (dk[1, :, :45] == 0).all() and (dv[1, :, :45] == 0).all()
    # the rows that see keys: as transformers (whose rows that see nothing are excluded by g = 0)
    g0 = upstream(q, mask) * (g != 0)
    got = grads(tiled_core(mask, block=(16, 32)), q, k, v, g0)
    want = grads(lambda q, k, v: hf_core(q, k, v, mask), q, k, v, g0)
    for a, b in zip(got, want, strict=True):
        assert note("tiled vs HF, fully masked rows (f32)", maxerr(a, b)) <= F32_TOL


def test_only_some_inputs_need_grad():
    """Only q (then only k and v) requires grad: the others get no gradient; the computed ones are unchanged."""
    q, k, v = qkv(2, 4, 2, 70, 70, 32, seed=5)
    mask = left_padding_mask(70, [0, 20])
    g = upstream(q, mask)
    full = grads(tiled_core(mask, block=(16, 48)), q, k, v, g)
    qq = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(tiled_core(mask, block=(16, 48))(qq, k, v), qq, g)
    assert torch.equal(dq, full[0])
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    dk, dv = torch.autograd.grad(tiled_core(mask, block=(16, 48))(q, kk, vv), (kk, vv), g)
    assert torch.equal(dk, full[1]) and torch.equal(dv, full[2])


def test_lse_gradient_vs_float64_logsumexp():
    """loss = sum(lse * h) + sum(out * g) and lse alone, vs autograd through torch.logsumexp in float64 (rows that
    see no key excluded by h = 0 there; tiled gives them zero gradient)."""
    S, Sk = 50, 80
    mask = left_padding_mask(Sk, [0, 45])
    q, k, v = qkv(2, 4, 2, S, Sk, 16, seed=9)
    keep = allowed_mask(S, Sk, mask)  # (B, 1, S, Sk)
    h = torch.randn(2, 4, S, generator=torch.Generator().manual_seed(2)) * keep.any(-1)

    def lse64(q, k, v):
        s = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)) / 4.0  # (B, H, S, Sk), d = 16
        return torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)  # (B, H, S)

    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    want = torch.autograd.grad((lse64(qd, kd, None) * h).sum(), (qd, kd))
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    _, lse = tiled.core(qt, kt, vt, attention_mask=mask, block_q=16, block_k=32)
    dq, dk, dv = torch.autograd.grad((lse * h).sum(), (qt, kt, vt), allow_unused=True)
    assert dv is None or (dv == 0).all()
    for a, b in zip((dq, dk), want, strict=True):
        assert note("tiled lse gradient vs float64 (f32)", maxerr(a, b)) <= 1e-5
    # both outputs at once: the lse term adds to the out term
    g = upstream(q, mask, Sk=Sk)
    out, lse = tiled.core(qt, kt, vt, attention_mask=mask, block_q=16, block_k=32)
    both = torch.autograd.grad((out * g).sum() + (lse * h).sum(), (qt, kt, vt))
    only_out = grads(tiled_core(mask, block=(16, 32)), q, k, v, g)
    torch.testing.assert_close(both[0], only_out[0] + dq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], only_out[1] + dk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2], only_out[2], atol=1e-5, rtol=1e-5)


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every aten bmm / baddbmm (incl. in place)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten.baddbmm_.default):
            self.shapes.append(tuple(out.shape))
        return out


def test_backward_skips_causal_tiles():
    """Per computed tile the backward makes two (.., g*bq, bk) products (S_ij and dP_ij): 36 tiles of 64 x 64 at
    S=512 causal (8 * 9 / 2, blocks above the diagonal skipped), 64 non-causal."""
    q, k, v = qkv(1, 2, 1, 512, 512, 24, seed=0)
    g = torch.randn(q.shape)
    for causal, tiles in ((True, 36), (False, 64)):
        out, lse = tiled.flash_forward(q, k, v, block_q=64, block_k=64, causal=causal)
        with MatmulShapes() as rec:
            tiled.flash_backward(q, k, v, out, lse, g, block_q=64, block_k=64, causal=causal)
        assert sum(s[1:] == (2 * 64, 64) for s in rec.shapes) == 2 * tiles
        assert len(rec.shapes) == 5 * tiles  # S, dV, dP, dQ, dK


# --------------------------------------------------------------------------------------------------------------
# the layer vs transformers' LlamaAttention


def llama_attention(cfg, weights):
    """transformers' LlamaAttention (eager) and rotary embedding, built as harness/reference.py builds them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    hf_cfg = LlamaConfig.from_dict(cfg)
    hf_cfg._attn_implementation = "eager"
    attn = LlamaAttention(hf_cfg, 0).eval()
    attn.load_state_dict({f"{n}.weight": w for n, w in weights.items()})
    return attn, LlamaRotaryEmbedding(hf_cfg)


@pytest.mark.parametrize("block", [(16, 48), (128, 256)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_attention_layer_grads_vs_llama_attention(block):
    """d/dx and d/dW (q, k, v, o_proj) of sum(layer(x) * g) in float32, batch 2 with left padding; g = 0 on padded
    query rows (transformers' rows there are not meaningful). Tolerance relative to the gradient's largest entry: the
    weight gradients sum over 140 tokens (max |dW| up to 45). Measured <= 5.6e-7 relative (2.5e-5 absolute), the
    size of transformers' own float32 error vs its float64 run (<= 2.6e-5 on the same cases)."""
    S = 70
    for H, Hkv in GQA:
        cfg = dict(SMALL, num_attention_heads=H, num_key_value_heads=Hkv)
        w = random_weights(cfg, seed=H + Hkv)
        x = torch.randn(2, S, 128, generator=torch.Generator().manual_seed(H * Hkv))
        pos = torch.arange(S)[None].expand(2, -1)
        mask = left_padding_mask(S, [0, 25])
        g = torch.randn(2, S, 128, generator=torch.Generator().manual_seed(7)) * mask[..., None]

        attn, rope = llama_attention(cfg, w)
        xh = x.clone().requires_grad_()
        keep = allowed_mask(S, S, mask)  # (B, 1, S, S)
        bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        out, _ = attn(xh, position_embeddings=rope(xh, pos), attention_mask=bias)
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        want = torch.autograd.grad(out, [xh] + [getattr(attn, n).weight for n in names], g)

        xt = x.clone().requires_grad_()
        wt = {n: t.clone().requires_grad_() for n, t in w.items()}
        got_out = tiled.attention(
            xt, wt, config=cfg, position_ids=pos, attention_mask=mask, block_q=block[0], block_k=block[1]
        )
        got = torch.autograd.grad(got_out, [xt] + [wt[n] for n in names], g)
        for name, a, b in zip(["x"] + names, got, want, strict=True):
            assert a.shape == b.shape
            err = maxerr(a, b) / float(b.abs().max())
            note(f"tiled.attention d{name} vs LlamaAttention, relative (f32)", err)
            assert err <= LAYER_REL_TOL, (name, err)


# --------------------------------------------------------------------------------------------------------------
# the memory proof for the backward, and the no-grad forward


@pytest.mark.slow
def test_memory_backward_no_seq_by_seq_tensor_at_4096():
    """Llama-3.2-1B's attention shapes (H=32, Hkv=8, d=64), float32, B=1, default blocks: the backward, run by
    autograd, never creates an S x S tensor. Spot check: dv of the last key = sum over its 4 query heads of
    P[S-1, S-1] g[S-1], in float64."""
    S, H, Hkv, d = 4096, 32, 8, 64
    q, k, v = (t.requires_grad_() for t in qkv(1, H, Hkv, S, S, d, seed=0))
    out, lse = tiled.core(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    with TensorRecorder() as rec:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    assert len(rec.seen) > 1000  # the recorder saw the backward's tile computations
    assert any("aten.exp" in f for f, _ in rec.seen)  # the P tiles (exp_ of S - lse)
    bad = quadratic(rec.seen, S)
    assert not bad, f"tiled's backward created S x S tensors: {bad[:5]}"
    assert max(math.prod(s) for _, s in rec.seen) < S * S
    # the last key is seen only by the last query of each head, with P = exp(s - lse) there
    qd, kd = q.detach().double(), k.detach().double()
    s = (qd[0, :, -1] * kd[0, :, -1].repeat_interleave(4, 0)).sum(-1) / 8.0  # (H,) scores of the last query/key
    p = torch.exp(s - lse[0, :, -1].detach().double())  # (H,)
    want = (p[:, None] * g[0, :, -1].double()).view(Hkv, 4, d).sum(1)  # (Hkv, d)
    assert note("tiled dv spot check at 4096 (f32)", maxerr(dv[0, :, -1], want)) <= 1e-5
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_no_grad_forward_is_flash_forward(dtype):
    """core without a gradient is flash_forward itself (no autograd graph); with one, the Function's forward is
    flash_forward too: out and lse bit for bit equal in both cases."""
    q, k, v = qkv(2, 4, 2, 100, 100, 32, seed=4, dtype=dtype)
    mask = left_padding_mask(100, [0, 30])
    ref_out, ref_lse = tiled.flash_forward(q, k, v, mask, block_q=16, block_k=48)
    for ctx, needs in ((torch.no_grad(), True), (torch.enable_grad(), False), (torch.enable_grad(), True)):
        qq = q.clone().requires_grad_(needs)
        with ctx:
            out, lse = tiled.core(qq, k, v, attention_mask=mask, block_q=16, block_k=48)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert (out.grad_fn is not None) == (needs and torch.is_grad_enabled() and isinstance(ctx, torch.enable_grad))
