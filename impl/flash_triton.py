"""FlashAttention-2 in Triton, forward and backward, in the manner of Triton's tutorial 06-fused-attention.py: the
forward kernel (impl/flash_triton_fwd.py), the backward kernels (impl/flash_triton_bwd.py) and here, last, what
launches them: the autograd Function and the contracts (`core`, `attention`).

The kernel contract's variants are computed in the kernels, forward and backward: causal masks and sliding windows
as one band of keys per query (loop bounds per query block skip the tiles outside it, so a fixed window costs time
and traffic linear in the sequence), gemma2's logit softcap, and gpt_oss's attention sinks (one logit per query
head in the softmax's denominator; lse includes it). GQA reads KV head h // g, never repeating K/V in memory; the
padding mask [B, Sk] is read one key block at a time.

Where it runs: tensors on a CUDA device run the compiled kernels; CPU tensors run them in Triton's interpreter
(numpy, one program at a time: slow, but exact enough to verify the kernels and to count their memory traffic).
impl/triton_cpu.py holds that plumbing (and the deferred @triton_cpu.jit: importing this module does not import
triton); the bench's closed form of the forward's traffic is harness/bench/triton_traffic.py.
"""

from __future__ import annotations

import numbers

import torch

from impl import flash_triton_bwd, flash_triton_fwd, layer, triton_cpu
from impl.gqa import groups

# Block sizes (constexpr). 64 x 64 is the common FlashAttention-2 tile for head_dim 64..128 (tutorial 06's autotune
# space is BLOCK_M in {64, 128} x BLOCK_N in {32, 64, 128}): on a GPU a Q tile, a K and a V tile of 64 x d in half
# precision plus the 64 x 64 float32 S tile fit registers/shared memory at 4-8 warps. Not tuned here (no GPU);
# callers may pass others (powers of two, >= 16 for tl.dot on a GPU). The interpreter's cost is Python overhead
# per tile, so its time falls roughly with the number of tiles; results do not depend on the block sizes beyond
# float32 summation order.
BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per inner-loop tile
MASK_DTYPE = torch.int8  # the padding mask as the kernel reads it: 1 byte per key


def band(causal: bool, window) -> tuple[int | None, int | None]:
    """(left, right): the query at position p sees key j iff p - left <= j <= p + right; None = unbounded.

    window is FlashAttention's window_size (left, right), -1 or None = unbounded on that side; causal bounds the
    right side at 0 (AND with the window). transformers' sliding_window W on a causal layer is (W - 1, 0)."""
    left, right = (None, None) if window is None else window
    left = None if left is None or left == -1 else left
    right = None if right is None or right == -1 else right
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _checked_window(window) -> tuple[int | None, int | None] | None:
    """window as a pair of Python ints or None (numpy integers accepted), or ValueError."""
    if window is None:
        return None
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    ok = ok and all(w is None or (isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1)
                    for w in window)  # fmt: skip
    if not ok:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= -1 (-1 or None: unbounded), got "
                         f"{window!r}")  # fmt: skip
    return tuple(None if w is None else int(w) for w in window)


def _launch(kernel, grid, *args, interpret, d, dtype, **constexprs):
    """kernel[grid](*args): compiled, or in the interpreter (impl/triton_cpu.py)."""
    constexprs.update(
        HEAD_DIM=d,
        D_PAD=max(16, 1 << (d - 1).bit_length()),  # a power of two (tl.arange), >= 16 (tl.dot on a GPU)
        EMULATE_BF16=interpret and dtype == torch.bfloat16,  # see _round_bf16
        PRECISION="ieee" if dtype == torch.float32 else "tf32",  # float32: exact products, not TF32's 10 bits
    )
    if interpret:
        triton_cpu.launch_interpreted(kernel, grid, *args, **constexprs)
    else:  # 4 warps for d <= 64, 8 above (tutorial 06's autotune range): the Q and acc tiles grow with d
        kernel[grid](*args, **constexprs, num_warps=4 if d <= 64 else 8, num_stages=2)


def _interpret(q) -> bool:
    """Load the kernels (triton is imported on the first launch). CUDA tensors run compiled, unless
    TRITON_INTERPRET=1 was set before triton was imported; CPU tensors in the interpreter."""
    triton_cpu.load(flash_triton_fwd)
    triton_cpu.load(flash_triton_bwd)
    return not (q.is_cuda and triton_cpu.compiled(flash_triton_fwd.attn_fwd))


def _mask_strides(keep):
    return keep.stride() if keep is not None else (0, 0)


def _variant_args(left, right, softcap) -> tuple[tuple, dict]:
    """The kernels' win_left, win_right and softcap arguments, and the constexprs that switch them on."""
    flags = dict(HAS_LEFT=left is not None, HAS_RIGHT=right is not None, SOFTCAP=softcap > 0)
    return (left or 0, right or 0, softcap if softcap > 0 else 1.0), flags


class _FlashAttention(torch.autograd.Function):
    """out, lse = forward kernel; gradients of q, k, v by the backward kernels (lse's gradient included), of the
    sinks by their formula on the saved lse."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, keep, left, right, softcap, scale, block_m, block_n):
        # keep: None or (B, Sk) int8; sinks: None or (H,) float32; on validated inputs
        B, H, Sq, d = q.shape
        out = torch.empty_like(q)  # (B, H, Sq, d)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)  # (B, H, Sq)
        if q.numel() == 0:
            lse.fill_(float("-inf"))
        else:
            args, flags = _variant_args(left, right, softcap)
            _launch(
                flash_triton_fwd.attn_fwd, (-(-Sq // block_m), B * H),  # (query blocks, batch * heads)
                q, k, v, keep, sinks, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                *_mask_strides(keep), H, H // k.shape[1], Sq, k.shape[2], scale, *args,
                interpret=_interpret(q), d=d, dtype=q.dtype, **flags, HAS_MASK=keep is not None,
                HAS_SINKS=sinks is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, keep, sinks)
        ctx.args = (left, right, softcap, scale, block_m, block_n)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse, keep, sinks = ctx.saved_tensors
        left, right, softcap, scale, block_m, block_n = ctx.args
        B, H, Sq, d = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        delta = (do.float() * out.float()).sum(-1)  # (B, H, Sq): rowsum(dO * O) = rowsum(P * dP)
        if dlse is not None:
            delta = delta - dlse
        # rows that see no key (and no sink): P = 0 there, delta kept finite
        delta = torch.where(torch.isneginf(lse), 0.0, delta).contiguous()
        dsinks = None
        if sinks is not None:  # d sink = -sum over rows of P_sink * Delta, P_sink = exp(sink - lse) (0 at lse -inf)
            p_sink = torch.where(torch.isneginf(lse), 0.0, torch.exp(sinks[None, :, None] - lse))  # (B, H, Sq)
            dsinks = -(p_sink * delta).sum((0, 2))  # (H,) float32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        nones = (None,) * 7
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), dsinks, *nones
        args, flags = _variant_args(left, right, softcap)
        common = dict(
            interpret=_interpret(q), d=d, dtype=q.dtype, **flags, HAS_MASK=keep is not None,
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        _launch(
            flash_triton_bwd.attn_bwd_dkdv, (-(-Sk // block_n), B * Hkv),  # (key blocks, batch * KV heads)
            q, k, v, do, lse, delta, keep, dk, dv, *strides, *dk.stride(), *dv.stride(), *_mask_strides(keep),
            H, H // Hkv, Sq, Sk, scale, *args, **common,
        )  # fmt: skip
        _launch(
            flash_triton_bwd.attn_bwd_dq, (-(-Sq // block_m), B * H),  # (query blocks, batch * heads)
            q, k, v, do, lse, delta, keep, dq, *strides, *dq.stride(), *_mask_strides(keep),
            H, H // Hkv, Sq, Sk, scale, *args, **common,
        )  # fmt: skip
        return dq, dk, dv, dsinks, *nones


def core(
    q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None,
    block_m=BLOCK_M, block_n=BLOCK_N,
):  # fmt: skip
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (out (B, H, Sq, d) in q's dtype, lse (B, H, Sq)).

    Query i sits at position p = Sk - Sq + i (bottom-right aligned). causal: it sees keys j <= p. attention_mask
    [B, Sk] marks padded keys with 0. window (left, right): it sees only p - left <= j <= p + right (-1 or None:
    unbounded on that side; AND with causal). softcap > 0: scores (after the scale) become softcap * tanh(s /
    softcap), masks after. sinks (H,) (float32; one logit per query head): added to the softmax's denominator with
    no value. lse is float32, natural log, the whole denominator (sink included); a row that sees no key has out 0
    and lse -inf, or the sink. CUDA tensors run compiled, CPU tensors in Triton's interpreter. No copies of q, k, v:
    any strides. Differentiable (q, k, v and sinks; through out and lse) by the backward kernels.
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    groups(H, Hkv)
    if k.shape != (B, Hkv, Sk, d) or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, Hkv, Sk, d) = {(B, Hkv, Sk, d)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v: one dtype of float32/bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    for n in (block_m, block_n):
        if n < 1 or n & (n - 1):
            raise ValueError(f"block sizes must be powers of two, got {block_m}, {block_n}")
    window = _checked_window(window)
    softcap = float(softcap or 0.0)
    if not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (H,):
            raise ValueError(f"sinks must be a float32 tensor [H] = [{H}], got {getattr(sinks, 'shape', sinks)}")
        sinks = sinks.to(device=q.device, dtype=torch.float32).contiguous()  # differentiable: dsinks flows back
    scale = d**-0.5 if scale is None else float(scale)
    keep = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, Sk):
            raise ValueError(f"attention_mask must be [B, Sk] = {[B, Sk]}, got {list(attention_mask.shape)}")
        keep = (attention_mask != 0).to(device=q.device, dtype=MASK_DTYPE)  # (B, Sk): a small copy, 1 byte a key
    left, right = (None if w is None else min(w, Sq + Sk) for w in band(causal, window))  # no int32 overflow
    return _FlashAttention.apply(q, k, v, sinks, keep, left, right, softcap, scale, block_m, block_n)


def attention(x, weights, *, config, position_ids, attention_mask=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """The plug-in contract (impl/__init__.py): x (B, S, D) -> (B, S, D), the one layer (impl/layer.py) around
    this core."""
    return layer.attention(core, x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask,
                           block_m=block_m, block_n=block_n)  # fmt: skip
