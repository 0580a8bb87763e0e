"""FlashAttention-2's backward pass as Triton kernels: P is recomputed from Q, K and the forward's lse, never stored
(impl/flash_triton_fwd.py is the forward, impl/flash_triton.py the autograd wrapper that launches both).

    S = softcap(scale Q K^T)   P = exp(S - lse)   dV = P^T dO   dP = dO V^T   dS = P * (dP - Delta) * S'
    dQ = scale dS K            dK = scale dS^T Q

with Delta = rowsum(dO * O) (= rowsum(P * dP)) minus lse's own incoming gradient (d lse_i / d S_ij = P_ij), and
S' = 1 - tanh^2(s / softcap) the cap's derivative (1 without a cap). A sink needs nothing here: lse includes it, so
P is already the sink-normalised probability and d out / d S has the same form; the sink's own gradient,
-sum_i P_sink,i Delta_i with P_sink = exp(sink - lse), is a sum over rows the wrapper takes in torch.

dK, dV: one program per key block of one KV head, looping over the g query heads of its group and over the query
blocks whose bands reach the keys (no atomics: the program owns its dK, dV rows). dQ: one program per query block,
looping over the key blocks its band spans, as the forward does. Both loops skip blocks wholly outside the band, so
a window's backward also grows linearly with the sequence. Every tile is masked here (simpler; the forward shows
the split into edge tiles and whole ones).
"""

from __future__ import annotations

from impl import triton_cpu
from impl.flash_triton_fwd import cast, in_band, key_range, tanh_sech2

tl = None  # triton.language, once loaded (impl/triton_cpu.py)


@triton_cpu.jit
def attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Mask, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale, win_left, win_right, softcap,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
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

    # -- the query rows whose bands reach these keys: query i (position offset + i) sees key n iff
    #    n - right <= offset + i <= n + left, so rows first key - right - offset .. last key + left - offset
    offset = Sk - Sq
    lo = 0
    hi = Sq
    if HAS_RIGHT:
        lo = tl.maximum(start_n * BLOCK_N - win_right - offset, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        last_key = tl.minimum(start_n * BLOCK_N + BLOCK_N, Sk) - 1
        hi = tl.minimum(tl.maximum(last_key + win_left - offset + 1, 0), Sq)
    for j in range(G):  # the query heads sharing KV head hk
        h = hk * G + j
        for start_m in range(lo, hi, BLOCK_M):
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
            if SOFTCAP:
                t, dcap = tanh_sech2(s / softcap)
                s = softcap * t
            keep = row_ok[:, None] & keep_n[None, :] & in_band(offset + rows, offs_n, win_left, win_right,
                                                                HAS_LEFT, HAS_RIGHT)  # fmt: skip
            pT = tl.trans(tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None]))  # (BLOCK_N, BLOCK_M)
            # -- dV += P^T dO;  dS^T = P^T * (dP^T - Delta) * S'^T, dP^T = V dO^T;  dK += dS^T Q
            dv = tl.dot(cast(pT, do.dtype, EMULATE_BF16), do, dv, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * tl.trans(dcap)
            dk = tl.dot(cast(dsT, q.dtype, EMULATE_BF16), q, dk, input_precision=PRECISION)

    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, cast(dk * scale, DK.dtype.element_ty, EMULATE_BF16), mask=kv_ok)
    tl.store(dv_ptrs, cast(dv, DV.dtype.element_ty, EMULATE_BF16), mask=kv_ok)


@triton_cpu.jit
def attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, Mask, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    H, G, Sq, Sk, scale, win_left, win_right, softcap,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
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

    # -- the keys this block's band spans, [lo, hi) as in the forward, in masked tiles; K^T, V^T (D_PAD, BLOCK_N)
    kT_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    offset = Sk - Sq
    p_first = offset + start_m * BLOCK_M
    lo, hi = key_range(p_first, tl.minimum(p_first + BLOCK_M - 1, Sk - 1), Sk, win_left, win_right,
                       HAS_LEFT, HAS_RIGHT)  # fmt: skip
    for start_n in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        keys = start_n + offs_n
        key_ok = (keys >= lo) & (keys < hi)
        kv_ok = d_ok[:, None] & key_ok[None, :]
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=kv_ok, other=0.0)
        vT = tl.load(vT_ptrs + start_n * stride_vn, mask=kv_ok, other=0.0)
        if EMULATE_BF16:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        keep = key_ok[None, :] & in_band(offset + rows, keys, win_left, win_right, HAS_LEFT, HAS_RIGHT)
        if HAS_MASK:
            keep = keep & (tl.load(Mask + b * stride_mb + keys * stride_mn, mask=key_ok, other=0) != 0)[None, :]
        # -- P = exp(S - lse); dS = P * (dO V^T - Delta) * S'; dQ += dS K
        s = tl.dot(q, kT, input_precision=PRECISION) * scale
        if SOFTCAP:
            t, dcap = tanh_sech2(s / softcap)
            s = softcap * t
        p = tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None])  # (BLOCK_M, BLOCK_N)
        ds = p * (tl.dot(do, vT, input_precision=PRECISION) - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(cast(ds, kT.dtype, EMULATE_BF16), tl.trans(kT), dq, input_precision=PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, cast(dq * scale, DQ.dtype.element_ty, EMULATE_BF16), mask=qd_ok)
