"""impl.flash_triton (FlashAttention-2 kernels in Triton: forward and backward) run in Triton's interpreter
(impl.triton_cpu), harness.bench.kernel_traffic (the bytes a kernel moves, counted in the interpreter) and
harness.bench.triton_traffic (the closed form of the forward kernel's traffic).

Covers: the counter on vector add (exact bytes: masked lanes excluded, an unmasked load counts every lane, element
sizes; the interpreter restored on exit, also on error); the kernel's counted traffic == traffic_model exactly
(lengths off the block grid, causal and not, MHA/GQA/MQA, padding mask, Sq < Sk, Sq = 1, head_dim 96's padded lanes,
bfloat16/float16, default and small blocks; windows of 1, 17 and past the sequence, one- and two-sided, decoding and
chunked prefill past the window, sinks) and keys_seen's closed form vs the per-block sum (windows included), a fixed
window's traffic linear in the length; core against
transformers' eager_attention_forward and a float64 computation over a stacked parametrization (Sq = Sk, Sq = 1,
Sq < Sk; causal and not; head_dim 32..256; MHA/GQA/MQA; lengths 1, 17, 113, 257; several block sizes), lse against
float64 logsumexp, padding with a fully padded batch row (out 0, lse -inf, no NaN), scores in the thousands, strided
(non-contiguous) inputs, bfloat16/float16 by the FlashAttention rule; the layer against LlamaAttention; gradients
(the backward kernels) against float64 autograd (through out and lse), bfloat16/float16 gradients by the same rule
against HF eager's, the layer's gradients (x and the four projections) against LlamaAttention's; how the
interpreter is selected (a fresh process: the import does not import triton, the launch leaves triton's mode,
TRITON_INTERPRET, triton.language and the kernel modules as they were). Window, softcap and sinks against
transformers' own functions: tests/test_triton_variants.py. Slow tier: 1000 tokens on Llama-3.2-1B's shapes, traffic
at 1024, half-precision gradients, TRITON_INTERPRET=1 preset, and compiling the kernels (with and without window,
softcap, sinks) for an sm_90 GPU (no GPU needed).

Run with `-s` to see the largest errors measured per comparison.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from attn_ref import SMALL, Worst, exact, maxerr, qkv
from attn_ref import allowed_mask as allowed
from conftest import ROOT, random_weights

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from harness.bench.kernel_traffic import count  # noqa: E402
from harness.bench.triton_traffic import block_keys, clamped_sum, keys_seen, tiles_loaded, traffic_model  # noqa: E402
from impl import flash_triton as ft  # noqa: E402
from impl import flash_triton_bwd as ft_bwd  # noqa: E402
from impl import flash_triton_fwd as ft_fwd  # noqa: E402
from impl import triton_cpu  # noqa: E402

F32_TOL = 1e-5  # float32, outputs O(1): measured errors are ~1e-6 (printed with -s)


WORST = Worst("test_triton")
note = WORST.note


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield from WORST.single_threaded()


def hf_eager(q, k, v, attention_mask=None, causal=True):
    """transformers' eager_attention_forward with an explicit additive mask (its None is not causal): (B, H, Sq, d)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = torch.nn.Module().eval()
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    keep = allowed(q.shape[2], k.shape[2], attention_mask, causal)
    bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    out, _ = eager_attention_forward(module, q, k, v, bias, scaling=q.shape[-1] ** -0.5, dropout=0.0)
    return out.transpose(1, 2)  # (B, H, Sq, d)


def padding_mask(Sk, pads):
    """[B, Sk]: row b has pads[b] leading zeros (pads[b] = Sk: a fully padded row)."""
    m = torch.ones(len(pads), Sk, dtype=torch.long)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


# --------------------------------------------------------------------------------------------------------------
# the counter, on vector add


def _add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=ok) + tl.load(y_ptr + offs, mask=ok), mask=ok)


def _copy_unmasked(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr):
    """out = x, and y loaded too (no arithmetic: the interpreter adds bfloat16's storage bits as integers)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)  # noqa: F841 (loaded, not used: still a load)
    tl.store(out_ptr + offs, x)


def test_counter_vector_add_masked():
    """1000 float32 in BLOCK=256 programs (4, the last 232 lanes active): 2 x 4000 bytes loaded, 4000 stored."""
    x, y = torch.rand(1000), torch.rand(1000)
    out = torch.empty(1000)
    with count() as t:
        triton_cpu.interpreted(_add)[(4,)](x, y, out, 1000, BLOCK=256)
    assert torch.equal(out, x + y)
    assert (t.load_bytes, t.store_bytes, t.load_calls, t.store_calls) == (8000, 4000, 8, 4)
    assert t.total_bytes == 12000


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.int8, 1)])
def test_counter_unmasked_counts_every_lane(dtype, size):
    x, y = torch.ones(1024, dtype=dtype), torch.ones(1024, dtype=dtype)
    out = torch.empty(1024, dtype=dtype)
    with count() as t:
        triton_cpu.interpreted(_copy_unmasked)[(4,)](x, y, out, BLOCK=256)
    assert (out.float() == 1).all()
    assert (t.load_bytes, t.store_bytes, t.load_calls, t.store_calls) == (2 * 1024 * size, 1024 * size, 8, 4)


def test_counter_restores_the_interpreter():
    from triton.runtime.interpreter import InterpreterBuilder as IB

    before = {n: getattr(IB, n) for n in ("create_masked_load", "create_masked_store", "create_atomic_rmw")}
    with pytest.raises(RuntimeError), count():
        assert IB.create_masked_load is not before["create_masked_load"]
        raise RuntimeError
    assert {n: getattr(IB, n) for n in before} == before
    x = torch.rand(10)
    with count() as t:
        triton_cpu.interpreted(_add)[(1,)](x, x, torch.empty(10), 10, BLOCK=16)
    assert (t.load_bytes, t.store_bytes) == (80, 40)


# --------------------------------------------------------------------------------------------------------------
# the kernel's traffic == traffic_model

TRAFFIC = [  # B, H, Hkv, Sq, Sk, d, causal, mask, dtype, (block_m, block_n)[, window, sinks]
    (1, 2, 1, 37, 37, 32, True, False, torch.float32, (16, 16)),
    (2, 4, 2, 33, 70, 96, True, True, torch.bfloat16, (16, 32)),  # Sq < Sk, d padded to 128
    (1, 3, 1, 40, 40, 64, False, True, torch.float16, (32, 16)),  # MQA, non-causal
    (1, 2, 2, 1, 65, 64, True, False, torch.float32, (16, 16)),  # decoding
    (2, 2, 1, 1, 33, 32, False, True, torch.float32, (16, 64)),
    (1, 2, 1, 50, 20, 32, True, True, torch.float32, (16, 16)),  # Sq > Sk: the first rows see nothing
    (1, 4, 2, 130, 200, 64, True, True, torch.float32, (ft.BLOCK_M, ft.BLOCK_N)),  # the default blocks
    # windows: the loops skip tiles left of the band; edge tiles load only [lo, hi); a sink is one load a program
    (1, 2, 1, 100, 100, 32, True, True, torch.float32, (16, 16), (16, 0), True),  # sliding_window 17
    (1, 2, 1, 70, 70, 32, True, False, torch.float32, (16, 32), (0, 0), False),  # window 1: the diagonal only
    (1, 2, 2, 1, 90, 32, True, True, torch.float32, (16, 16), (20, -1), True),  # decoding past the window
    (1, 2, 1, 30, 90, 32, True, False, torch.bfloat16, (16, 16), (24, 0), True),  # chunked prefill past it
    (1, 2, 1, 60, 60, 32, False, True, torch.float16, (16, 16), (7, 3), False),  # two-sided, non-causal
    (1, 2, 1, 60, 25, 32, False, False, torch.float32, (16, 16), (-1, 2), False),  # right side only, Sq > Sk
    (1, 2, 1, 40, 40, 32, True, False, torch.float32, (16, 16), (100, 0), False),  # wider than the sequence
]


@pytest.mark.parametrize("case", TRAFFIC, ids=lambda c: f"{c[3]}x{c[4]}-d{c[5]}-{'c' if c[6] else 'nc'}-{c[1]}/{c[2]}"
                         + (f"-w{c[10][0]},{c[10][1]}{'-sinks' if c[11] else ''}" if len(c) > 10 else ""))  # fmt: skip
def test_counted_traffic_equals_model(case):
    B, H, Hkv, Sq, Sk, d, causal, has_mask, dtype, (bm, bn), window, has_sinks = (*case, None, False)[:12]
    q, k, v = qkv(B, H, Hkv, Sq, Sk, d, seed=Sq + Sk, dtype=dtype)
    mask = padding_mask(Sk, [Sk // 3] + [0] * (B - 1)) if has_mask else None
    sinks = torch.linspace(-1.0, 2.0, H) if has_sinks else None
    with count() as t:
        out, lse = ft.core(q, k, v, causal=causal, attention_mask=mask, window=window, sinks=sinks,
                           block_m=bm, block_n=bn)  # fmt: skip
    want = traffic_model(B, H, Hkv, Sq, Sk, d, dtype=dtype, causal=causal, block_m=bm, block_n=bn, has_mask=has_mask,
                         window=window, has_sinks=has_sinks)  # fmt: skip
    got = {"load_bytes": t.load_bytes, "store_bytes": t.store_bytes, "load_calls": t.load_calls}
    assert got | {"store_calls": t.store_calls} == want
    # and the output is right (the window's own references: tests/test_triton_variants.py)
    if window is None and sinks is None:
        ref, _ = exact(q, k, v, mask, causal)
        tol = F32_TOL if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_windowed_traffic_grows_linearly():
    """A fixed window: the keys loaded grow by the same amount for each added query block (bounded per block), while
    causal's grow with the length; at 16384 tokens a window of 512 reads ~1/14 of causal's K/V bytes."""
    per_block = [keys_seen(n, n, causal=True, block_m=64, window=(511, 0)) for n in (4096, 8192, 16384)]
    assert per_block[2] - per_block[1] == 2 * (per_block[1] - per_block[0])  # linear in n
    assert per_block[2] <= (16384 // 64) * (512 + 64)  # each block: at most window + block_m keys
    w, c = (traffic_model(1, 32, 8, 16384, 16384, 64, dtype=torch.bfloat16, causal=True, window=win)
            for win in ((511, 0), None))  # fmt: skip
    assert 10 < c["load_bytes"] / w["load_bytes"] < 20


def test_keys_seen_closed_form():
    """keys_seen (clamped arithmetic series in closed form) == the per-block sum of hi - lo, over lengths, block
    sizes, causal or not and windows bounded on either side, none or both; clamped_sum against its definition."""
    windows = [None, (0, 0), (5, 0), (16, 0), (3, 7), (-1, 4), (9, -1), (200, 200)]
    for Sq in range(0, 70, 3):
        for Sk in range(1, 70, 4):
            for bm in (1, 4, 16, 64):
                for causal in (True, False):
                    for w in windows:
                        n = -(-Sq // bm)
                        per_block = sum(h - lo for lo, h in (block_keys(i, Sq, Sk, causal=causal, block_m=bm,
                                                                        window=w) for i in range(n)))  # fmt: skip
                        got = keys_seen(Sq, Sk, causal=causal, block_m=bm, window=w)
                        assert got == per_block, (Sq, Sk, bm, causal, w)
    for c in range(-40, 40, 3):
        for step in (1, 3, 16):
            for n in (0, 1, 5, 17):
                for top in (0, 1, 10, 33):
                    assert clamped_sum(c, step, n, top) == sum(min(top, max(0, c + i * step)) for i in range(n))
    # block_n never changes the bytes, only the number of loads
    a, b = (traffic_model(1, 32, 8, 4096, 4096, 64, dtype=torch.bfloat16, causal=True, block_n=n) for n in (32, 128))
    assert (a["load_bytes"], a["store_bytes"]) == (b["load_bytes"], b["store_bytes"])
    assert a["load_calls"] > b["load_calls"]
    assert tiles_loaded(100, 100, causal=True, block_m=16, block_n=16, window=(16, 0)) < tiles_loaded(
        100, 100, causal=True, block_m=16, block_n=16)


# --------------------------------------------------------------------------------------------------------------
# float32 against transformers and float64: a stacked parametrization

LENGTHS = [(1, 1), (17, 17), (113, 113), (257, 257), (1, 257), (1, 17), (17, 113), (113, 257)]  # (Sq, Sk)
DIMS = [32, 64, 96, 128, 256]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA g=2, MQA
BLOCKS = [(64, 64), (16, 16), (32, 64), (16, 128), (128, 32)]
STACKED = [
    (Sq, Sk, causal, DIMS[(2 * i + causal) % 5], HEADS[(i + causal) % 3], BLOCKS[(i + 2 * causal) % 5])
    for i, (Sq, Sk) in enumerate(LENGTHS)
    for causal in (True, False)
]


def check_f32(q, k, v, mask=None, *, causal=True, tag="f32", **blocks):
    out, lse = ft.core(q, k, v, causal=causal, attention_mask=mask, **blocks)
    ref, ref_lse = exact(q, k, v, mask, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    seen = torch.isfinite(ref_lse)  # rows that see at least one key
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert (out[~seen] == 0).all()
    hf = hf_eager(q, k, v, mask, causal)  # its rows that see nothing are a uniform average: not compared
    note(f"triton vs float64 ({tag})", maxerr(out, ref))
    note(f"HF eager vs float64 ({tag})", maxerr(hf[seen], ref[seen]))
    note(f"triton vs HF eager ({tag})", maxerr(out[seen], hf[seen]))
    note(f"lse vs float64 logsumexp ({tag})", maxerr(lse[seen], ref_lse[seen]))
    torch.testing.assert_close(out.double(), ref, atol=F32_TOL, rtol=F32_TOL)
    torch.testing.assert_close(out[seen], hf[seen], atol=F32_TOL, rtol=F32_TOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=F32_TOL, rtol=F32_TOL)  # -inf == -inf counts as equal
    return out, lse


@pytest.mark.parametrize(
    "Sq,Sk,causal,d,heads,blocks",
    STACKED,
    ids=[f"{c[0]}x{c[1]}-{'c' if c[2] else 'nc'}-d{c[3]}-{c[4][0]}/{c[4][1]}-b{c[5][0]}x{c[5][1]}" for c in STACKED],
)
def test_core_f32_stacked(Sq, Sk, causal, d, heads, blocks):
    H, Hkv = heads
    q, k, v = qkv(2 if Sq < 100 else 1, H, Hkv, Sq, Sk, d, seed=Sq * 1000 + Sk + d)
    check_f32(q, k, v, causal=causal, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("Sq,Sk,causal", [(17, 17, True), (113, 113, True), (1, 257, True), (40, 70, False)])
def test_core_f32_padding_with_a_fully_padded_row(Sq, Sk, causal):
    """Batch 3: no padding, left padding past the first queries' keys, every key padded (out 0, lse -inf)."""
    mask = padding_mask(Sk, [0, Sk // 3 + 1, Sk])
    q, k, v = qkv(3, 4, 2, Sq, Sk, 64, seed=Sq + Sk)
    out, lse = check_f32(q, k, v, mask, causal=causal, tag="f32 padded", block_m=32, block_n=32)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_core_strided_inputs_need_no_copies():
    """q, k, v as the projections produce them: (B, S, n, d) transposed to (B, n, S, d), not contiguous."""
    B, S, H, Hkv, d = 2, 45, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, H, d, generator=g).transpose(1, 2)  # (B, H, S, d), stride (S*H*d, d, H*d, 1)
    k = torch.randn(B, S, Hkv, d, generator=g).transpose(1, 2)  # (B, Hkv, S, d)
    v = torch.randn(B, S, Hkv, d, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    check_f32(q, k, v, padding_mask(S, [0, 10]), tag="f32 strided", block_m=16, block_n=32)


def test_large_scores_stable():
    """Scores ~ N(0, 2500^2) (inputs x50): exp would overflow without the running max; no NaN, rows that see nothing
    still 0 / -inf. Near one-hot softmax: the error is the score rounding (float32 products summed in another order
    than torch's), so the bound is relative to transformers' own error against float64."""
    S = 130
    q, k, v = qkv(2, 4, 2, S, S, 64, seed=11, scale=50.0)
    for m in (None, padding_mask(S, [0, 37])):
        out, lse = ft.core(q, k, v, attention_mask=m, block_m=32, block_n=64)
        ref, ref_lse = exact(q, k, v, m)
        seen = torch.isfinite(ref_lse)
        assert not torch.isnan(out).any() and torch.equal(torch.isneginf(lse), ~seen)
        hf = hf_eager(q, k, v, m)
        e, e_hf = maxerr(out[seen], ref[seen]), maxerr(hf[seen], ref[seen])
        note("triton x50 vs float64", e)
        note("HF eager x50 vs float64", e_hf)
        note("triton x50 vs HF eager", maxerr(out[seen], hf[seen]))
        assert e <= 2 * e_hf + 1e-5, (e, e_hf)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-6)  # lse ~ 1e4: float32 precision


# --------------------------------------------------------------------------------------------------------------
# half precision: the FlashAttention rule


HALF = [  # Sq, Sk, causal, d, (H, Hkv), padded
    (1, 1, True, 64, (4, 2), False),
    (17, 17, True, 128, (4, 1), True),
    (113, 113, True, 64, (4, 2), True),
    (1, 113, True, 96, (4, 4), False),
    (40, 70, False, 32, (4, 2), True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", HALF, ids=lambda c: f"{c[0]}x{c[1]}-d{c[3]}")
def test_core_half_precision(case, dtype):
    """|ours - f64| <= 2 |HF same dtype - f64| + eps(dtype)/8 max|f64| (max abs over the tensor, rows that see a key;
    f64 from the same rounded inputs). The floor only matters where HF is (nearly) exact, e.g. one key."""
    Sq, Sk, causal, d, (H, Hkv), padded = case
    q, k, v = qkv(2, H, Hkv, Sq, Sk, d, seed=Sq + d, dtype=dtype)
    mask = padding_mask(Sk, [0, Sk // 2]) if padded else None
    out, lse = ft.core(q, k, v, causal=causal, attention_mask=mask, block_m=32, block_n=32)
    ref, ref_lse = exact(q, k, v, mask, causal)
    seen = torch.isfinite(ref_lse)
    hf = hf_eager(q, k, v, mask, causal)
    assert out.dtype == dtype and not torch.isnan(out).any() and (out[~seen] == 0).all()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    e, e_hf = maxerr(out[seen], ref[seen]), maxerr(hf[seen], ref[seen])
    note(f"triton {name} vs float64", e)
    note(f"HF eager {name} vs float64", e_hf)
    note(f"triton/HF error ratio ({name})", e / max(e_hf, 1e-30))
    floor = torch.finfo(dtype).eps / 8 * float(ref.abs().max())
    assert e <= 2 * e_hf + floor, (e, e_hf, floor)
    # scores from half inputs are exact float32 products: lse carries only float32 rounding
    assert torch.equal(torch.isneginf(lse), ~seen)
    note(f"lse vs float64 logsumexp ({name})", maxerr(lse[seen], ref_lse[seen]))
    torch.testing.assert_close(lse[seen].double(), ref_lse[seen], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# the layer against transformers' LlamaAttention


def llama_attention(config, weights, grad=False):
    """transformers' LlamaAttention (eager) and rotary embedding, built as harness/verify/reference.py does: a
    function (x, position_ids, attention_mask) -> out, with the module as its .module."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = LlamaConfig.from_dict(config)
    cfg._attn_implementation = "eager"
    attn = LlamaAttention(cfg, 0).eval()
    attn.load_state_dict({f"{n}.weight": w for n, w in weights.items()})
    rope = LlamaRotaryEmbedding(cfg)

    def run(x, position_ids, attention_mask=None):
        B, S, _ = x.shape
        keep = allowed(S, S, attention_mask).expand(B, 1, S, S)
        bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        with torch.set_grad_enabled(grad):
            return attn(x, position_embeddings=rope(x, position_ids), attention_mask=bias)[0]

    run.module = attn
    return run


def small_config(H, Hkv, d, D):
    return {**SMALL, "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": d}


@pytest.mark.parametrize("H,Hkv,d,D,S", [(4, 2, 32, 128, 70), (9, 3, 64, 576, 48)], ids=["small-gqa", "smollm2-shapes"])
def test_attention_vs_llama_attention(H, Hkv, d, D, S):
    cfg = small_config(H, Hkv, d, D)
    w = random_weights(cfg, seed=H + Hkv)
    x = torch.randn(2, S, D, generator=torch.Generator().manual_seed(S))
    pos = torch.arange(S)[None].expand(2, -1)
    mask = padding_mask(S, [0, S // 3])
    ref = llama_attention(cfg, w)
    for m in (None, mask):
        want = ref(x, pos, m)
        got = ft.attention(x, w, config=cfg, position_ids=pos, attention_mask=m)
        rows = slice(None) if m is None else mask.bool()  # padding query rows: HF's are not meaningful
        note("triton.attention vs LlamaAttention (f32)", maxerr(got[rows], want[rows]))
        torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# gradients: the backward kernels through torch.autograd


def reference_loss(q, k, v, go, gl, mask=None, causal=True):
    """float64 sum(out * go) + sum(lse * gl) over rows that see a key, differentiable everywhere (a masked score is
    -1e30, not -inf, and rows that see nothing are zeroed, so no NaN reaches the gradients)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    keep = allowed(q.shape[2], k.shape[2], mask, causal)
    seen = keep.any(-1, keepdim=True)  # (B|1, 1, Sq, 1)
    s = s.masked_fill(~keep, -1e30)
    out = (torch.softmax(s, -1) * seen) @ v
    lse = torch.where(seen[..., 0], torch.logsumexp(s, -1), 0.0)
    return (out * go).sum() + (lse * gl).sum()


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fn(*leaves).backward()
    return [t.grad for t in leaves]


GRAD = [  # B, H, Hkv, Sq, Sk, d, causal, padded, (block_m, block_n)
    (2, 4, 2, 37, 37, 32, True, True, (16, 16)),  # GQA, a fully padded row
    (1, 4, 1, 20, 50, 96, True, False, (16, 32)),  # MQA, Sq < Sk, d padded
    (2, 2, 2, 33, 33, 64, False, True, (32, 16)),  # non-causal
    (1, 2, 1, 1, 70, 64, True, False, (ft.BLOCK_M, ft.BLOCK_N)),  # decoding, default blocks
]


@pytest.mark.parametrize("case", GRAD, ids=lambda c: f"{c[3]}x{c[4]}-d{c[5]}-{'c' if c[6] else 'nc'}-{c[1]}/{c[2]}")
def test_gradients_f32(case):
    """dq, dk, dv of sum(out * go) + sum(lse * gl) against float64 autograd: out's and lse's gradients both flow."""
    B, H, Hkv, Sq, Sk, d, causal, padded, (bm, bn) = case
    q, k, v = qkv(B, H, Hkv, Sq, Sk, d, seed=Sq + Sk + d)
    mask = padding_mask(Sk, [Sk // 4] + [Sk] * (B - 1)) if padded else None
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(B, H, Sq, d, generator=g), torch.randn(B, H, Sq, generator=g)

    def ours(q, k, v):
        out, lse = ft.core(q, k, v, causal=causal, attention_mask=mask, block_m=bm, block_n=bn)
        return (out * go).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum()

    got = grads(ours, q, k, v)
    want = grads(
        lambda q, k, v: reference_loss(q, k, v, go.double(), gl.double(), mask, causal),
        *(t.double() for t in (q, k, v)),
    )
    for name, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == torch.float32 and not torch.isnan(a).any()
        note(f"d{name} vs float64 (f32)", maxerr(a, b))
        torch.testing.assert_close(a.double(), b, atol=F32_TOL, rtol=F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_half_precision(dtype):
    """The FlashAttention rule on dq, dk, dv: |ours - f64| <= 2 |HF eager same dtype - f64| + eps/8 max|f64|.
    Rows that see no key get zero output gradient (HF's are a uniform average there, not 0)."""
    B, H, Hkv, S, d = 2, 4, 2, 37, 64
    q, k, v = qkv(B, H, Hkv, S, S, d, seed=5, dtype=dtype)
    mask = padding_mask(S, [0, S // 2])
    seen = allowed(S, S, mask).any(-1)  # (B, 1, S)
    go = torch.randn(B, H, S, d, generator=torch.Generator().manual_seed(2)) * seen[..., None]
    zero = torch.zeros(B, H, S)

    def ours(q, k, v):
        return (ft.core(q, k, v, attention_mask=mask, block_m=16, block_n=16)[0].float() * go).sum()

    got = grads(ours, q, k, v)
    hf = grads(lambda q, k, v: (hf_eager(q, k, v, mask).float() * go).sum(), q, k, v)
    want = grads(
        lambda q, k, v: reference_loss(q, k, v, go.double(), zero.double(), mask), *(t.double() for t in (q, k, v))
    )
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    for n, a, h, w in zip("qkv", got, hf, want, strict=True):
        assert a.dtype == dtype and not torch.isnan(a).any()
        e, e_hf = maxerr(a, w), maxerr(h, w)
        note(f"d{n} {name} vs float64", e)
        note(f"d{n} HF eager {name} vs float64", e_hf)
        floor = torch.finfo(dtype).eps / 8 * float(w.abs().max())
        assert e <= 2 * e_hf + floor, (n, e, e_hf, floor)


def test_attention_gradients_vs_llama_attention():
    """The layer is differentiable end to end: d(loss)/dx and d(loss)/dW through the projections, RoPE and kernels."""
    cfg = small_config(4, 2, 32, 128)
    w = random_weights(cfg, seed=7)
    x = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(8))
    pos = torch.arange(40)[None].expand(2, -1)
    gy = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(9))

    def ours(x, wq, wk, wv, wo):
        ww = {"q_proj": wq, "k_proj": wk, "v_proj": wv, "o_proj": wo}
        return (ft.attention(x, ww, config=cfg, position_ids=pos) * gy).sum()

    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    ref = llama_attention(cfg, w, grad=True)
    xr = x.clone().requires_grad_()
    (ref(xr, pos) * gy).sum().backward()
    theirs = [xr.grad] + [getattr(ref.module, n).weight.grad for n in names]
    for name, a, b in zip(("x", *names), grads(ours, x, *(w[n] for n in names)), theirs, strict=True):
        note("triton.attention grads vs LlamaAttention (f32)", maxerr(a, b))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# how the interpreter is selected, and what a launch leaves behind


def test_launch_leaves_triton_as_it_was():
    from triton.runtime.interpreter import InterpreterBuilder as IB

    q, k, v = qkv(1, 2, 1, 20, 20, 32)
    ft.core(q, k, v, block_m=16, block_n=16)  # the first launch: the interpreter adds its globals to this module's
    modules = (tl, tl.core, ft, ft_fwd, ft_bwd)
    before = ([dict(vars(m)) for m in modules], os.environ.get("TRITON_INTERPRET"))
    builder = dict(vars(IB))
    ft.core(q, k, v, block_m=16, block_n=16)
    after = ([dict(vars(m)) for m in modules], os.environ.get("TRITON_INTERPRET"))
    assert after == before and dict(vars(IB)) == builder
    assert type(tl.max).__name__ == type(ft_fwd.attn_fwd).__name__  # both decorated in the process's own mode
    assert ft_bwd.cast is ft_fwd.cast  # a shared helper: the backward's name bound to the forward's decoration


FRESH = r"""
import os, sys
import impl.flash_triton as ft
assert "triton" not in sys.modules, "import impl.flash_triton imported triton"
import torch
q, k, v = (torch.randn(1, h, 21, 32, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
out, lse = ft.core(q, k, v, block_m=16, block_n=16)
import triton
from triton.runtime.jit import JITFunction
mode = "interpret" if os.environ.get("TRITON_INTERPRET") == "1" else "compile"
assert triton.knobs.runtime.interpret == (mode == "interpret")
@triton.jit
def later(x):
    pass
print(mode, type(later).__name__, type(ft.flash_triton_fwd.attn_fwd).__name__, type(triton.language.max).__name__)
s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-2, -1)) / 32 ** 0.5
s = s.masked_fill(torch.ones(21, 21, dtype=torch.bool).triu(1), float("-inf"))
print(float((out.double() - torch.softmax(s, -1) @ v.double().repeat_interleave(2, 1)).abs().max()))
"""


def run_fresh(tmp_path, env_extra: dict) -> list[str]:
    script = tmp_path / "fresh.py"  # a file, not -c: triton.jit needs the source of `later`
    script.write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_extra
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.mark.slow
def test_fresh_process_interprets_without_setting_anything(tmp_path):
    """No CUDA, triton not imported before: import is triton-free; the launch interprets; afterwards triton is in its
    default (compiling) mode and TRITON_INTERPRET is unset: a kernel decorated later is a JITFunction."""
    mode, later, kernel, std, err = run_fresh(tmp_path, {})
    assert (mode, later, kernel, std) == ("compile", "JITFunction", "JITFunction", "JITFunction")
    assert float(err) < F32_TOL


@pytest.mark.slow
def test_fresh_process_with_triton_interpret_preset(tmp_path):
    """TRITON_INTERPRET=1 set by the user before triton is imported: everything is interpreted; still correct."""
    mode, later, kernel, std, err = run_fresh(tmp_path, {"TRITON_INTERPRET": "1"})
    assert mode == "interpret" and {later, kernel, std} == {"InterpretedFunction"}
    assert float(err) < F32_TOL


def test_input_errors():
    q, k, v = qkv(1, 4, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="multiple"):
        ft.core(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))
    with pytest.raises(ValueError, match="attention_mask"):
        ft.core(q, k, v, attention_mask=torch.ones(1, 7))
    with pytest.raises(ValueError, match="dtype"):
        ft.core(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="powers of two"):
        ft.core(q, k, v, block_m=48)


# --------------------------------------------------------------------------------------------------------------
# slow tier


@pytest.mark.slow
def test_llama_shapes_long_and_traffic():
    """Llama-3.2-1B attention shapes (32 query heads, 8 KV heads, d 64), float32 causal, 384 tokens (one
    interpreted call; the bench's full run counts 1024 and records count == closed form in its rows): spot rows of
    every head against float64 (first and last rows of blocks, the last row), and the counted traffic ==
    traffic_model."""
    n = 384
    q, k, v = qkv(1, 32, 8, n, n, 64, seed=0)
    with count() as t:
        out, lse = ft.core(q, k, v)
    rows = torch.tensor([0, 1, 63, 64, 300, n - 1])
    s = (q[0, :, rows].double() @ k[0].double().repeat_interleave(4, 0).transpose(-2, -1)) / 8.0  # (H, 6, S)
    s = s.masked_fill(torch.arange(n)[None, None, :] > rows[None, :, None], float("-inf"))
    want = torch.softmax(s, -1) @ v[0].double().repeat_interleave(4, 0)
    note(f"triton seq-{n} spot rows vs float64", maxerr(out[0, :, rows], want))
    torch.testing.assert_close(out[0, :, rows].double(), want, atol=F32_TOL, rtol=F32_TOL)
    torch.testing.assert_close(lse[0, :, rows].double(), torch.logsumexp(s, -1), atol=F32_TOL, rtol=F32_TOL)
    want = traffic_model(1, 32, 8, n, n, 64, dtype=torch.float32, causal=True)
    assert (t.load_bytes, t.store_bytes) == (want["load_bytes"], want["store_bytes"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,dtype,d,band,has_mask,softcap,sinks",
    [
        ("attn_fwd", "fp16", 64, (False, True), True, False, False),  # causal
        ("attn_fwd", "bf16", 96, (False, False), False, False, False),
        ("attn_fwd", "fp32", 64, (False, True), False, False, False),
        ("attn_fwd", "bf16", 128, (True, True), True, True, True),  # a window, softcap and sinks
        ("attn_bwd_dkdv", "bf16", 64, (False, True), True, False, False),
        ("attn_bwd_dkdv", "fp16", 64, (True, True), False, True, False),
        ("attn_bwd_dq", "fp16", 128, (False, True), False, False, False),
        ("attn_bwd_dq", "bf16", 64, (True, False), True, True, False),
    ],
)
def test_compiles_for_a_gpu(name, dtype, d, band, has_mask, softcap, sinks):
    """The compiled path, without a GPU: each kernel lowers through Triton's NVIDIA backend to an sm_90 cubin, with
    and without the band's sides, the cap and the sinks."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = ft_fwd if name == "attn_fwd" else ft_bwd
    triton_cpu.load(module)
    fn = getattr(module, name)
    if type(fn).__name__ != "JITFunction":
        pytest.skip("TRITON_INTERPRET=1 is set: no compiled kernel in this process")
    consts = dict(
        HAS_LEFT=band[0], HAS_RIGHT=band[1], HAS_MASK=has_mask, SOFTCAP=softcap, HEAD_DIM=d,
        D_PAD=1 << (d - 1).bit_length(), BLOCK_M=ft.BLOCK_M, BLOCK_N=ft.BLOCK_N, EMULATE_BF16=False,
        PRECISION="ieee" if dtype == "fp32" else "tf32",
    )  # fmt: skip
    if name == "attn_fwd":
        consts["HAS_SINKS"] = sinks
        if not sinks:
            consts["Sinks"] = None
    if not has_mask:
        consts["Mask"] = None
    sig = {}
    for p in fn.params:
        n = p.name
        sig[n] = (
            "constexpr" if p.is_constexpr or n in consts
            else f"*{dtype}" if n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")
            else "*i8" if n == "Mask" else "*fp32" if n in ("Lse", "Delta", "Sinks")
            else "fp32" if n in ("scale", "softcap") else "i32"
        )  # fmt: skip
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    options = {"num_warps": 4 if d <= 64 else 8, "num_stages": 2}  # as impl.flash_triton launches it
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"]
    assert ("mma" in kernel.asm["ptx"]) == (dtype != "fp32")  # tensor cores for half; exact float32 FMAs ("ieee")
