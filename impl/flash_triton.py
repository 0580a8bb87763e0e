"""FlashAttention-2 forward and backward as Triton kernels, in the manner of Triton's tutorial 06-fused-attention.py.

One program computes one block of BLOCK_M query rows of one (batch, head): it loads its Q block once, then streams
over the K/V blocks the block can see, keeping per row a running max m, a running sum l of exp(s - m) and an
unnormalised accumulator acc in float32 (on a GPU: in registers; S and P never reach global memory). When a key
block raises the max from m to m', what was accumulated was scaled by exp(-m) and is rescaled (equation 6 of the
FlashAttention paper):

    m'   = max(m, rowmax(S_j))          S_j = scale * Q K_j^T
    P_j  = exp(S_j - m')
    l'   = exp(m - m') l + rowsum(P_j)
    acc' = exp(m - m') acc + P_j V_j

and at the end out = acc / l, lse = m + log l (natural log; -inf and out = 0 for a row that sees no key).

Causal masks are bottom-right aligned (query i is key position Sk - Sq + i). A query block's key range is split
into the tiles wholly below the diagonal (every row sees every key: no mask, stage 1) and the tiles that cross it
(masked, stage 2); tiles wholly above the diagonal are never visited (the loop bound). GQA: query head h reads KV
head h // g from the (B, Hkv, Sk, d) tensors, so K/V are never repeated in memory. The padding mask [B, Sk]
(1 = key, 0 = padding) is read one key block at a time.

Inputs: float32, bfloat16 or float16, any strides (they are passed to the kernel; a unit stride on d is what makes
loads coalesce on a GPU). Scores, softmax and acc are float32; out is in q's dtype. head_dim is padded to a power of
two with masked loads (96 -> 128); head_dim 32, 64, 96, 128 and 256 are tested.

Backward: two more kernels (dK/dV per key block, dQ per query block) recompute P from the saved lse, wrapped
with the forward in a torch.autograd.Function, so `core` and `attention` are differentiable.

Where it runs: tensors on a CUDA device run the compiled kernels; CPU tensors run them in Triton's interpreter
(numpy, one program at a time: slow, but exact enough to verify the kernels and to count their memory traffic).
impl/triton_cpu.py holds that plumbing (and the deferred @triton_cpu.jit: importing this module does not import
triton); the bench's closed form of the forward's traffic is harness/bench/triton_traffic.py.
"""

from __future__ import annotations

import sys

import torch

from impl import triton_cpu
from impl.gqa import groups
from impl.projection import heads, output, project_qkv

# Block sizes (constexpr). 64 x 64 is the common FlashAttention-2 tile for head_dim 64..128 (tutorial 06's autotune
# space is BLOCK_M in {64, 128} x BLOCK_N in {32, 64, 128}): on a GPU a Q tile, a K and a V tile of 64 x d in half
# precision plus the 64 x 64 float32 S tile fit registers/shared memory at 4-8 warps. Not tuned here (no GPU);
# callers may pass others (powers of two, >= 16 for tl.dot on a GPU). The interpreter's cost is Python overhead
# per tile, so its time falls roughly with the number of tiles; results do not depend on the block sizes beyond
# float32 summation order.
BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # keys per inner-loop tile
MASK_DTYPE = torch.int8  # the padding mask as the kernel reads it: 1 byte per key

# triton.language: None until the first launch's triton_cpu.load() imports triton (slow) and decorates the
# @triton_cpu.jit functions below with triton.jit, rebinding their names here so they call one another decorated
tl = None


# --------------------------------------------------------------------------------------------------------------
# the forward kernel


@triton_cpu.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state (float32) and this program's Q block
    k_ptrs, v_ptrs, mask_ptrs,  # K^T (D_PAD, BLOCK_N), V (BLOCK_N, D_PAD), mask (BLOCK_N,) pointers at key 0
    stride_kn, stride_vn, stride_mn,
    lo, hi,  # key tiles start at lo, step BLOCK_N, stop before hi (hi: one past the last key this block may see)
    offs_m, offs_n, d_ok, offset, scale,
    MASKED: tl.constexpr,  # stage 2: tiles crossing the diagonal or the end of the keys
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:  # keys >= hi (past the last key, or past the diagonal of the block's last row) are not loaded
            keys = start_n + offs_n  # (BLOCK_N,) key positions of this tile
            key_ok = keys < hi
        # -- load K_j^T
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_N)
        if EMULATE_BF16:
            k = k.to(tl.float32)
        # -- S_j = scale * Q K_j^T in float32 (scaled after the product, as transformers does)
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        # -- masks: causal (bottom-right) and the end of the keys in stage 2, padding in both stages
        if MASKED:
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (keys[None, :] <= offset + offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        if HAS_MASK:
            if MASKED:
                pad = tl.load(mask_ptrs + start_n * stride_mn, mask=key_ok, other=0)
            else:
                pad = tl.load(mask_ptrs + start_n * stride_mn)  # (BLOCK_N,)
            s = tl.where(pad[None, :] != 0, s, float("-inf"))
        # -- online softmax (equation 6): m' = max(m, rowmax(S)), P = exp(S - m'), alpha = exp(m - m')
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key: no shift (-inf - -inf)
        p = tl.exp(s - shift[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        alpha = tl.exp(m_i - shift)  # rescales what was accumulated with the old max
        l_i = l_i * alpha + tl.sum(p, 1)  # l' = alpha l + rowsum(P)
        # -- acc' = alpha acc + P V_j, P rounded to V's dtype as the GPU's tensor-core product takes it
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)  # (BLOCK_N, D_PAD)
        if EMULATE_BF16:
            v = v.to(tl.float32)
        p = _cast(p, v.dtype, EMULATE_BF16)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)  # (BLOCK_M, D_PAD)
        m_i = m_new
    return acc, l_i, m_i


@triton_cpu.jit
def _cast(x, dtype, EMULATE_BF16: tl.constexpr):
    """float32 x converted to dtype, as a tl.dot operand (P, dS) or for a store (out, dq, dk, dv). In the interpreter
    with bfloat16: rounded to bfloat16 values by hand and kept in float32 (see _round_bf16); a store's conversion
    of such a value is then exact."""
    if EMULATE_BF16:
        return _round_bf16(x)
    return x.to(dtype)


@triton_cpu.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), as float32, by integer arithmetic on the bits.

    Only for the interpreter: its float32 -> bfloat16 conversion truncates (rounds toward zero, which would bias
    P downwards) and its tl.dot on bfloat16 multiplies the raw 16-bit patterns as integers. With bfloat16 inputs it
    therefore runs the dots in float32 on operands holding bfloat16 values, which is what a tensor core computes: a
    product of two bfloat16 values is exact in float32 and the sum is accumulated in float32.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest, ties to even, at bit 16
    return bits.to(tl.float32, bitcast=True)


@triton_cpu.jit
def _fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale,  # G = H / Hkv query heads per KV head
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # -- which block: program (query block start_m, batch * head off_bh); query head h reads KV head h // G
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = (off_bh // H).to(tl.int64)  # 64-bit offsets: b * stride can pass 2^31 elements
    h = (off_bh % H).to(tl.int64)
    hk = h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys within a tile
    offs_d = tl.arange(0, D_PAD)  # (D_PAD,) head_dim padded to a power of two
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Sq

    # -- pointers: Q block (BLOCK_M, D_PAD); K^T (D_PAD, BLOCK_N) and V (BLOCK_N, D_PAD) at key 0; mask (BLOCK_N,)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_ptrs = Mask + b * stride_mb + offs_n * stride_mn if HAS_MASK else Mask

    # -- state: running max m = -inf, running sum l = 0, accumulator acc = 0 (float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, D_PAD], 0.0, dtype=tl.float32)

    # -- the Q block, loaded once: it stays on chip for the whole key loop
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # -- key range: query i is key position offset + i (bottom-right). Causal: the block's last row sees keys
    #    < hi; tiles [0, lo) are seen whole by its first row, hence by every row (stage 1, unmasked); tiles
    #    [lo, hi) cross the diagonal (stage 2, masked); keys >= hi are never visited. lo <= hi since
    #    offset + start_m * BLOCK_M + 1 <= min(Sk, offset + (start_m + 1) * BLOCK_M) for any row that exists.
    offset = Sk - Sq
    if CAUSAL:
        hi = tl.minimum(tl.maximum(offset + (start_m + 1) * BLOCK_M, 0), Sk)
        lo = tl.maximum(offset + start_m * BLOCK_M + 1, 0) // BLOCK_N * BLOCK_N
    else:  # every key: full tiles unmasked, the ragged last tile masked
        hi = Sk
        lo = Sk // BLOCK_N * BLOCK_N

    # -- stage 1: tiles wholly below the diagonal (no causal mask, no bounds check on keys)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, stride_kn, stride_vn, stride_mn, 0, lo,
        offs_m, offs_n, d_ok, offset, scale, False, CAUSAL, HAS_MASK, BLOCK_N, EMULATE_BF16, PRECISION,
    )  # fmt: skip
    # -- stage 2: tiles crossing the diagonal (or the end of the keys): masked
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, stride_kn, stride_vn, stride_mn, lo, hi,
        offs_m, offs_n, d_ok, offset, scale, True, CAUSAL, HAS_MASK, BLOCK_N, EMULATE_BF16, PRECISION,
    )  # fmt: skip

    # -- epilogue: out = acc / l (0 for a row that saw no key), lse = m + log l (-inf there: -inf + log 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]  # (BLOCK_M, D_PAD)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _cast(o, Out.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + off_bh * Sq + offs_m, m_i + tl.log(l_i), mask=row_ok)  # Lse is (B, H, Sq) contiguous


# --------------------------------------------------------------------------------------------------------------
# the backward kernels (FlashAttention-2's backward pass): P is recomputed from Q, K and the saved lse, never stored.
#
#     P = exp(S - lse)    dV = P^T dO    dP = dO V^T    dS = P * (dP - Delta)    dQ = scale dS K    dK = scale dS^T Q
#
# with Delta = rowsum(dO * O) (= rowsum(P * dP)), minus lse's own incoming gradient (d lse_i / d S_ij = P_ij).
# dK, dV: one program per key block of one KV head, looping over the g query heads of its group and over the query
# blocks that see the keys (no atomics: the program owns its dK, dV rows). dQ: one program per query block, looping
# over key blocks as the forward does. Every tile is masked here (simpler; the forward shows the two-stage split).


@triton_cpu.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Mask, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # -- which block: keys start_n * BLOCK_N .. of KV head hk of batch b
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    b = (off_bhk // (H // G)).to(tl.int64)
    hk = (off_bhk % (H // G)).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows within a tile
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    key_ok = offs_n < Sk
    kv_ok = key_ok[:, None] & d_ok[None, :]

    # -- this block's K_j^T (D_PAD, BLOCK_N) and V_j (BLOCK_N, D_PAD), loaded once; the keys that exist and are
    # not padding. K^T, as the forward loads it: S = Q K^T is then the forward's product operand for operand, so P
    # recomputed from lse is exactly the forward's (with scores in the thousands, S^T = K Q^T rounds otherwise)
    kT_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    kT = tl.load(kT_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    if EMULATE_BF16:
        kT = kT.to(tl.float32)
        v = v.to(tl.float32)
    keep_n = key_ok
    if HAS_MASK:
        keep_n = keep_n & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0) != 0)
    dk = tl.full([BLOCK_N, D_PAD], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, D_PAD], 0.0, dtype=tl.float32)

    # -- the query rows that see these keys: causal, query i sees key n iff n <= offset + i
    offset = Sk - Sq
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for j in range(G):  # the query heads sharing KV head hk
        h = hk * G + j
        for start_m in range(lo, Sq, BLOCK_M):
            rows = start_m + offs_m  # (BLOCK_M,)
            row_ok = rows < Sq
            # -- Q_i (BLOCK_M, D_PAD), dO_i (BLOCK_M, D_PAD), lse_i, Delta_i
            q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
            do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if EMULATE_BF16:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + (b * H + h) * Sq + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that sees no key: P = exp(S - inf) = 0
            delta = tl.load(Delta + (b * H + h) * Sq + rows, mask=row_ok, other=0.0)
            # -- P = exp(S - lse) (BLOCK_M, BLOCK_N), 0 where masked, and its transpose
            s = tl.dot(q, kT, input_precision=PRECISION) * scale
            keep = row_ok[:, None] & keep_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offset + rows[:, None])
            pT = tl.trans(tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None]))  # (BLOCK_N, BLOCK_M)
            # -- dV += P^T dO;  dS^T = P^T * (dP^T - Delta), dP^T = V dO^T;  dK += dS^T Q
            dv = tl.dot(_cast(pT, do.dtype, EMULATE_BF16), do, dv, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(_cast(dsT, q.dtype, EMULATE_BF16), q, dk, input_precision=PRECISION)

    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, _cast(dk * scale, DK.dtype.element_ty, EMULATE_BF16), mask=kv_ok)
    tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, EMULATE_BF16), mask=kv_ok)


@triton_cpu.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Mask, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # -- which block: as in the forward
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = (off_bh // H).to(tl.int64)
    h = (off_bh % H).to(tl.int64)
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < Sq
    qd_ok = row_ok[:, None] & d_ok[None, :]

    # -- Q_i, dO_i (BLOCK_M, D_PAD), lse_i, Delta_i, loaded once
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod
    q = tl.load(q_ptrs, mask=qd_ok, other=0.0)
    do = tl.load(do_ptrs, mask=qd_ok, other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + off_bh * Sq + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that sees no key: P = 0
    delta = tl.load(Delta + off_bh * Sq + rows, mask=row_ok, other=0.0)
    dq = tl.full([BLOCK_M, D_PAD], 0.0, dtype=tl.float32)

    # -- the keys this block sees (as in the forward), in masked tiles; K^T, V^T (D_PAD, BLOCK_N) at key 0
    kT_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    offset = Sk - Sq
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(tl.maximum(offset + (start_m + 1) * BLOCK_M, 0), Sk)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + offs_n
        key_ok = keys < hi
        kv_ok = d_ok[:, None] & key_ok[None, :]
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=kv_ok, other=0.0)
        vT = tl.load(vT_ptrs + start_n * stride_vn, mask=kv_ok, other=0.0)
        if EMULATE_BF16:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        keep = key_ok[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= offset + rows[:, None])
        if HAS_MASK:
            keep = keep & (tl.load(Mask + b * stride_mb + keys * stride_mn, mask=key_ok, other=0) != 0)[None, :]
        # -- P = exp(S - lse); dS = P * (dO V^T - Delta); dQ += dS K
        s = tl.dot(q, kT, input_precision=PRECISION) * scale
        p = tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None])  # (BLOCK_M, BLOCK_N)
        ds = p * (tl.dot(do, vT, input_precision=PRECISION) - delta[:, None])
        dq = tl.dot(_cast(ds, kT.dtype, EMULATE_BF16), tl.trans(kT), dq, input_precision=PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, _cast(dq * scale, DQ.dtype.element_ty, EMULATE_BF16), mask=qd_ok)


# --------------------------------------------------------------------------------------------------------------
# host side: launches, the autograd Function, the contracts


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
    triton_cpu.load(sys.modules[__name__])
    return not (q.is_cuda and triton_cpu.compiled(_fwd_kernel))


def _mask_strides(keep):
    return keep.stride() if keep is not None else (0, 0)


class _FlashAttention(torch.autograd.Function):
    """out, lse = forward kernel; gradients of q, k, v by the backward kernels (lse's gradient included)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, causal, scale, block_m, block_n):
        # keep: None or (B, Sk) int8, on validated inputs
        B, H, Sq, d = q.shape
        out = torch.empty_like(q)  # (B, H, Sq, d)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)  # (B, H, Sq)
        if q.numel() == 0:
            lse.fill_(float("-inf"))
        else:
            interpret = _interpret(q)
            _launch(
                _fwd_kernel, (-(-Sq // block_m), B * H),  # (query blocks, batch * heads)
                q, k, v, keep, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_mask_strides(keep),
                H, H // k.shape[1], Sq, k.shape[2], scale,
                interpret=interpret, d=d, dtype=q.dtype,
                CAUSAL=causal, HAS_MASK=keep is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, keep)
        ctx.args = (causal, scale, block_m, block_n)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse, keep = ctx.saved_tensors
        causal, scale, block_m, block_n = ctx.args
        B, H, Sq, d = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        delta = (do.float() * out.float()).sum(-1)  # (B, H, Sq): rowsum(dO * O) = rowsum(P * dP)
        if dlse is not None:
            delta = delta - dlse
        # rows that see no key: P = 0 there, delta kept finite
        delta = torch.where(torch.isneginf(lse), 0.0, delta).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_(), None, None, None, None, None
        interpret = _interpret(q)
        common = dict(
            interpret=interpret, d=d, dtype=q.dtype,
            CAUSAL=causal, HAS_MASK=keep is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        _launch(
            _bwd_dkdv_kernel, (-(-Sk // block_n), B * Hkv),  # (key blocks, batch * KV heads)
            q, k, v, do, lse, delta, keep, dk, dv, *strides, *dk.stride(), *dv.stride(), *_mask_strides(keep),
            H, H // Hkv, Sq, Sk, scale, **common,
        )  # fmt: skip
        _launch(
            _bwd_dq_kernel, (-(-Sq // block_m), B * H),  # (query blocks, batch * heads)
            q, k, v, do, lse, delta, keep, dq, *strides, *dq.stride(), *_mask_strides(keep),
            H, H // Hkv, Sq, Sk, scale, **common,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (out (B, H, Sq, d) in q's dtype, lse (B, H, Sq)).

    Causal masks are bottom-right aligned (query i sees keys 0 .. Sk - Sq + i); attention_mask [B, Sk] marks padded
    keys with 0; lse is float32, natural log, -inf (and out 0) where a row sees no key. CUDA tensors run compiled,
    CPU tensors in Triton's interpreter. No copies of q, k, v: any strides. Differentiable (q, k, v; through out
    and lse) by the backward kernels.
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
    scale = d**-0.5 if scale is None else float(scale)
    keep = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, Sk):
            raise ValueError(f"attention_mask must be [B, Sk] = {[B, Sk]}, got {list(attention_mask.shape)}")
        keep = (attention_mask != 0).to(device=q.device, dtype=MASK_DTYPE)  # (B, Sk): a small copy, 1 byte a key
    return _FlashAttention.apply(q, k, v, keep, causal, scale, block_m, block_n)


def attention(x, weights, *, config, position_ids, attention_mask=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """The plug-in contract (impl/__init__.py): x (B, S, D) -> (B, S, D)."""
    groups(*heads(config)[:2])
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2
    ctx, _ = core(q, k, v, attention_mask=attention_mask, block_m=block_m, block_n=block_n)  # (B, H, S, d)
    return output(ctx, weights)  # (B, S, D)
