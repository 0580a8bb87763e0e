"""FlashAttention-2's forward pass as a Triton kernel, in the manner of Triton's tutorial 06-fused-attention.py. Read
top to bottom with impl/flash_triton_bwd.py (the backward kernels) and impl/flash_triton.py (the autograd wrapper
and the contract, where the inputs are checked).

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

Which keys a query sees: a band. Query i sits at position p = Sk - Sq + i (bottom-right aligned) and sees key j iff
p - left <= j <= p + right, each side bounded or not (HAS_LEFT, HAS_RIGHT): causal is right = 0, a window (L, R)
is left = L, right = R, both sides unbounded is full attention (impl.flash_triton.band derives the two from causal
and window). A query block's keys are the range [lo, hi) its first and last rows' bands span, so tiles wholly
outside the band are never visited and a window's cost grows linearly with the sequence. Its tiles split into the
left edge [lo, a) (masked: some row's band starts inside), the tiles every row sees whole [a, b) (stage 1, no
mask, no bounds check) and the right edge [b, hi) (masked: the diagonal, the window's right side, the end of the
keys). Masked tiles load no key outside [lo, hi). GQA: query head h reads KV head h // g from the (B, Hkv, Sk, d)
tensors, so K/V are never repeated in memory. The padding mask [B, Sk] (1 = key, 0 = padding) is read one key block
at a time.

Softcap (gemma2): s = softcap * tanh(s / softcap) after the scale and before the masks, tanh from exp (Triton's
only tanh is libdevice's, which the interpreter cannot run). Sinks (gpt_oss's s_aux): one logit per query head in
the softmax's denominator, with no value. The running state starts at m = sink, l = exp(sink - m) = 1 instead of
m = -inf, l = 0, so out = acc / l and lse = m + log l include it with no further step, and a row that sees no key
gets out = 0, lse = sink.

Inputs: float32, bfloat16 or float16, any strides (a unit stride on d is what makes loads coalesce on a GPU).
Scores, softmax and acc are float32; out is in q's dtype. head_dim is padded to a power of two with masked loads.
`tl` is None until impl.triton_cpu.load() imports triton and decorates the @triton_cpu.jit functions here.
"""

from __future__ import annotations

from impl import triton_cpu

tl = None  # triton.language, once loaded (impl/triton_cpu.py): importing this module does not import triton


# --------------------------------------------------------------------------------------------------------------
# device helpers, shared with the backward kernels


@triton_cpu.jit
def key_range(
    p_first, p_last, Sk, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr
):  # fmt: skip
    """[lo, hi): the keys a block of queries at positions p_first .. p_last sees (the union of their bands)."""
    lo = 0
    hi = Sk
    if HAS_LEFT:
        lo = tl.maximum(p_first - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(p_last + win_right + 1, 0), Sk)
    return lo, hi


@triton_cpu.jit
def in_band(pos, keys, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(rows, keys) bool: pos[m] - left <= keys[n] <= pos[m] + right (sides that are unbounded always hold)."""
    keep = keys[None, :] >= 0
    if HAS_LEFT:
        keep = keep & (keys[None, :] >= pos[:, None] - win_left)
    if HAS_RIGHT:
        keep = keep & (keys[None, :] <= pos[:, None] + win_right)
    return keep


@triton_cpu.jit
def tanh_sech2(x):
    """(tanh x, 1 - tanh^2 x) in float32 from exp. Below |x| = 1/4 tanh is its odd Taylor polynomial to x^9 (the
    next term is < 1e-8 relative), above it (1 - e) / (1 + e), e = exp(-2|x|) (1 - e >= 0.39: no cancellation);
    sech^2 = 4e / (1 + e)^2 has none anywhere (1 - tanh^2 would lose it all where tanh -> 1)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)  # (0, 1]
    x2 = x * x
    series = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton_cpu.jit
def cast(x, dtype, EMULATE_BF16: tl.constexpr):
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


# --------------------------------------------------------------------------------------------------------------
# the forward kernel


@triton_cpu.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state (float32) and this program's Q block
    k_ptrs, v_ptrs, mask_ptrs,  # K^T (D_PAD, BLOCK_N), V (BLOCK_N, D_PAD), mask (BLOCK_N,) pointers at key 0
    stride_kn, stride_vn, stride_mn,
    start, stop,  # key tiles start at `start` (a multiple of BLOCK_N), step BLOCK_N, stop before `stop`
    lo, hi,  # the block's keys: a masked tile loads only keys lo .. hi - 1
    pos, offs_n, d_ok, win_left, win_right, scale, softcap,  # pos: (BLOCK_M,) the rows' positions
    MASKED: tl.constexpr,  # the band's edges: per-element masks and bounds-checked loads
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:  # keys outside [lo, hi) (outside every row's band, or past the last key) are not loaded
            keys = start_n + offs_n  # (BLOCK_N,) key positions of this tile
            key_ok = (keys >= lo) & (keys < hi)
        # -- load K_j^T
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_N)
        if EMULATE_BF16:
            k = k.to(tl.float32)
        # -- S_j = scale * Q K_j^T in float32 (scaled after the product, as transformers does), then capped
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            t, _ = tanh_sech2(s / softcap)
            s = softcap * t
        # -- masks (after the cap, as gemma2 adds its mask): the band in the edge tiles, padding everywhere
        if MASKED:
            keep = key_ok[None, :] & in_band(pos, keys, win_left, win_right, HAS_LEFT, HAS_RIGHT)
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
        p = cast(p, v.dtype, EMULATE_BF16)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)  # (BLOCK_M, D_PAD)
        m_i = m_new
    return acc, l_i, m_i


@triton_cpu.jit
def attn_fwd(
    Q, K, V, Mask, Sinks, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale, win_left, win_right, softcap,  # G = H / Hkv query heads per KV head
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
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

    # -- state: running max m = -inf, running sum l = 0, accumulator acc = 0 (float32); with a sink the softmax
    #    starts from it: m = sink, l = exp(sink - m) = 1 (0 for a sink of -inf, which is no sink)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    if HAS_SINKS:
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(Sinks + h)  # one float32 load per program
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    acc = tl.full([BLOCK_M, D_PAD], 0.0, dtype=tl.float32)

    # -- the Q block, loaded once: it stays on chip for the whole key loop
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # -- key range: query i is key position offset + i (bottom-right). The block's rows span positions p_first ..
    #    p_last and see keys [lo, hi). Every row sees a tile whole iff it starts at or after p_last - left (the last
    #    row's left edge) and ends at or before p_first + right + 1 (the first row's right edge) and Sk: the tiles
    #    [full_lo, full_hi), both multiples of BLOCK_N (or full_lo = full_hi = hi where the left edge reaches the
    #    block's end), so the three loops walk one tile grid: cdiv(hi - start, BLOCK_N) tiles in all.
    offset = Sk - Sq
    p_first = offset + start_m * BLOCK_M
    p_last = tl.minimum(p_first + BLOCK_M - 1, Sk - 1)  # rows past Sq are not computed: they do not widen it
    pos = offset + offs_m  # (BLOCK_M,)
    lo, hi = key_range(p_first, p_last, Sk, win_left, win_right, HAS_LEFT, HAS_RIGHT)
    start = lo // BLOCK_N * BLOCK_N  # the first tile
    full_lo = start
    if HAS_LEFT:
        full_lo = (tl.maximum(p_last - win_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, start), hi)
    full_hi = Sk // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        full_hi = tl.minimum(tl.maximum(p_first + win_right + 1, 0), Sk) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)

    # -- the band's left edge [start, full_lo): masked tiles
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, stride_kn, stride_vn, stride_mn, start, full_lo, lo, hi,
        pos, offs_n, d_ok, win_left, win_right, scale, softcap,
        True, HAS_LEFT, HAS_RIGHT, HAS_MASK, SOFTCAP, BLOCK_N, EMULATE_BF16, PRECISION,
    )  # fmt: skip
    # -- stage 1 [full_lo, full_hi): tiles every row sees whole (no band mask, no bounds check on keys)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, stride_kn, stride_vn, stride_mn, full_lo, full_hi, lo, hi,
        pos, offs_n, d_ok, win_left, win_right, scale, softcap,
        False, HAS_LEFT, HAS_RIGHT, HAS_MASK, SOFTCAP, BLOCK_N, EMULATE_BF16, PRECISION,
    )  # fmt: skip
    # -- the band's right edge [full_hi, hi) (the diagonal, the window's right side, the end of the keys): masked
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, stride_kn, stride_vn, stride_mn, full_hi, hi, lo, hi,
        pos, offs_n, d_ok, win_left, win_right, scale, softcap,
        True, HAS_LEFT, HAS_RIGHT, HAS_MASK, SOFTCAP, BLOCK_N, EMULATE_BF16, PRECISION,
    )  # fmt: skip

    # -- epilogue: out = acc / l (0 for a row that saw no key), lse = m + log l (-inf there: -inf + log 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]  # (BLOCK_M, D_PAD)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, cast(o, Out.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + off_bh * Sq + offs_m, m_i + tl.log(l_i), mask=row_ok)  # Lse is (B, H, Sq) contiguous
