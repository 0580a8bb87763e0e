"""The tiled backward (FlashAttention-2, Algorithm 2): gradients from the forward's out and lse, never an S x S matrix.

The forward keeps only out and lse; the backward recomputes each probability tile from lse, P_ij = exp(S_ij - lse_i),
which is already normalised. With D_i = rowsum(dO_i * O_i):

    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)         (the softmax Jacobian: dS = P * (dP - rowsum(P * dP)), and
                                          rowsum(P * dP) = rowsum(dO * O) = D, a d-wide sum instead of a bk-wide one)
    dQ_i += scale dS_ij K_j
    dK_j += scale dS_ij^T Q_i

The lse output is differentiable too, for free: d lse_i / d S_ij = P_ij, so a gradient dlse adds dlse_i P_ij to
dS_ij, which is the same formula with D_i - dlse_i in place of D_i. The variants (impl/tiled.py has the whole story):
- softcap: S = c tanh(X / c) of the scaled scores X, so dX = dS (1 - tanh^2), the tanh kept from the recomputation.
- sinks: the sink is one more logit with no value: it adds nothing to dV, dQ or dK (D stays rowsum(dO * O): the
  sink has no value in O), and its own gradient is dsink_h = -sum over (b, i) of P_sink (D_i - dlse_i), with
  P_sink = exp(sink_h - lse_i).
The loops are the forward's (query blocks outer, the same key blocks visited): dQ_i is accumulated over the key
blocks and written once, dK and dV are accumulated in full-size buffers (they are the size of k and v). Rows that see
no key (lse = -inf) use lse = +inf, so their P is 0 and their gradient 0, never NaN.
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups
from impl.tiles import (
    BLOCK_K,
    BLOCK_Q,
    accumulator_dtype,
    key_blocks,
    mask_tile,
    padding_bias,
    score_tiles,
    sink_rows,
)


def flash_backward(q, k, v, out, lse, dout, dlse=None, attention_mask=None, *, block_q=BLOCK_Q, block_k=BLOCK_K,
                   causal=True, scale=None, window=None, softcap=0.0, sinks=None,
                   needs=(True, True, True, False), score_heads=None):  # fmt: skip
    """Gradients of (out, lse) = flash_forward(q, k, v, ...): (dq, dk, dv, dsinks) in the inputs' dtypes.

    out, lse are the forward's results, dout (B, H, Sq, d) and dlse (B, H, Sq) or None the incoming gradients;
    needs says which of dq, dk, dv, dsinks to compute (the others are returned as None and their work skipped);
    score_heads: the forward's score GEMM batch (tiles.forward_heads), so that S is recomputed bit for bit.
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = groups(H, Hkv)
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K  # None: the defaults
    N = B * Hkv  # the batch of every tile matmul
    scale = d**-0.5 if scale is None else scale
    offset = Sk - Sq
    left, right = masks.bounds(window, causal)
    wide = accumulator_dtype(q.dtype)
    same = q.dtype == wide  # float32 / float64: no casts around the tile matmuls
    need_q, need_k, need_v, need_sinks = (tuple(needs) + (False,))[:4]
    need_sinks = need_sinks and sinks is not None
    alpha = scale / softcap if softcap else scale  # the forward's score GEMM, exactly
    pad = padding_bias(attention_mask, Hkv, wide, q.device)  # (B*Hkv, 1, Sk) or None
    qg = q.unflatten(1, (Hkv, g))  # (B, Hkv, g, Sq, d) views: query heads grouped by their KV head
    og = out.unflatten(1, (Hkv, g))  # (B, Hkv, g, Sq, d)
    dog = dout.to(q.dtype).unflatten(1, (Hkv, g))  # (B, Hkv, g, Sq, d)
    lg = lse.unflatten(1, (Hkv, g))  # (B, Hkv, g, Sq)
    dlg = dlse.unflatten(1, (Hkv, g)) if dlse is not None else None  # (B, Hkv, g, Sq)
    kk = k.reshape(N, Sk, d)  # (B*Hkv, Sk, d)
    vT = v.reshape(N, Sk, d).to(wide).transpose(1, 2)  # (B*Hkv, d, Sk), in `wide` for dP (see step 3)
    dq = torch.empty_like(q) if need_q else None  # (B, H, Sq, d), written one query block at a time
    dk = torch.zeros(N, Sk, d, dtype=wide, device=q.device) if need_k else None  # (B*Hkv, Sk, d) accumulators
    dv = torch.zeros(N, Sk, d, dtype=wide, device=q.device) if need_v else None
    dsinks = torch.zeros(Hkv, g, dtype=wide, device=q.device) if need_sinks else None  # (Hkv, g): head j*g + r
    biases = {}  # the edge biases of this call (tiles.mask_tile)

    for i0 in range(0, Sq, block_q):
        i1 = min(i0 + block_q, Sq)
        bq, R = i1 - i0, g * (i1 - i0)
        # this query block, its g heads stacked as in the forward: copies of (B*Hkv, g*bq, ...)
        qi = qg[:, :, :, i0:i1].reshape(N, R, d)  # (B*Hkv, g*bq, d)
        doi = dog[:, :, :, i0:i1].reshape(N, R, d)  # (B*Hkv, g*bq, d)
        dow = doi.to(wide)  # (B*Hkv, g*bq, d), the same values
        # D_i = rowsum(dO_i * O_i) (minus dlse_i: the lse's own gradient enters dS through the same term)
        Di = (dow * og[:, :, :, i0:i1].reshape(N, R, d).to(wide)).sum(-1, keepdim=True)  # (B*Hkv, g*bq, 1)
        if dlg is not None:
            Di.sub_(dlg[..., i0:i1].reshape(N, R, 1))
        li = lg[..., i0:i1].reshape(N, R, 1).to(wide)  # (B*Hkv, g*bq, 1)
        li = torch.where(torch.isfinite(li), li, float("inf"))  # rows that see no key: P = exp(s - inf) = 0
        if need_sinks:  # dsink = -sum P_sink (D - dlse), summed over the batch and the block's queries per head
            p_sink = torch.exp(sink_rows(sinks, B, Hkv, g, bq, wide, q.device) - li)  # (B*Hkv, g*bq, 1)
            dsinks.sub_((p_sink * Di).view(B, Hkv, g, bq).sum(dim=(0, 3)))  # (Hkv, g)
        if not (need_q or need_k or need_v):
            continue
        dqi = torch.zeros(N, R, d, dtype=wide, device=q.device) if need_q else None  # dQ_i accumulator

        for j0, j1 in key_blocks(i0, i1, offset, Sk, left, right, block_k):  # exactly the forward's blocks
            # 1. P_ij = exp(S_ij - lse_i), the scores exactly as in the forward (capped, masked the same way)
            s = score_tiles(qi, kk[:, j0:j1].transpose(1, 2), alpha, same, score_heads or N)  # (B*Hkv, g*bq, bk)
            t = None
            if softcap:
                t = s.tanh_()  # tanh(X / c), kept for its derivative
                s = t * softcap  # the capped scores, a new tile
            mask_tile(s, i0, i1, j0, j1, offset, left, right, pad, g, biases)
            p = s.sub_(li).exp_()  # (B*Hkv, g*bq, bk), in place of the scores
            ph = p if same else p.to(q.dtype)  # P in the input dtype, for the matmuls

            # 2. dV_j += P_ij^T dO_i (the sum over the g*bq stacked rows sums the g query heads)
            if need_v:
                if same:
                    dv[:, j0:j1].baddbmm_(ph.transpose(1, 2), doi)
                else:
                    dv[:, j0:j1].add_(torch.bmm(ph.transpose(1, 2), doi))
            if not (need_q or need_k):
                continue

            # 3. dS_ij = P_ij * (dO_i V_j^T - D_i), in place of dP. dP and D are nearly equal where P is large, so
            # dP must not be rounded to a half dtype before the subtraction (D is float32): for half inputs this
            # GEMM takes their values in float32, i.e. exact products accumulated in float32, as FlashAttention's
            # half-input GEMM does; a half-precision bmm would round dP and break the cancellation.
            ds = torch.bmm(dow, vT[:, :, j0:j1]).sub_(Di).mul_(p)  # (B*Hkv, g*bq, bk)
            if softcap:
                ds.mul_(t.mul_(t).neg_().add_(1))  # through the cap: d(c tanh(x / c))/dx = 1 - tanh^2 (t reused)
            dsh = ds if same else ds.to(q.dtype)  # dS in the input dtype, for the matmuls

            # 4. dQ_i += scale dS_ij K_j; dK_j += scale dS_ij^T Q_i
            if same:
                if need_q:
                    dqi.baddbmm_(dsh, kk[:, j0:j1], alpha=scale)
                if need_k:
                    dk[:, j0:j1].baddbmm_(dsh.transpose(1, 2), qi, alpha=scale)
            else:
                if need_q:
                    dqi.add_(torch.bmm(dsh, kk[:, j0:j1]), alpha=scale)
                if need_k:
                    dk[:, j0:j1].add_(torch.bmm(dsh.transpose(1, 2), qi), alpha=scale)

        if need_q:
            dq[:, :, i0:i1] = dqi.view(B, Hkv, g, bq, d).reshape(B, H, bq, d).to(q.dtype)  # (B, H, bq, d)

    dk = dk.view(B, Hkv, Sk, d).to(k.dtype) if need_k else None  # (B, Hkv, Sk, d)
    dv = dv.view(B, Hkv, Sk, d).to(v.dtype) if need_v else None  # (B, Hkv, Sk, d)
    dsinks = dsinks.reshape(H).to(sinks.dtype) if need_sinks else None  # (H,), float32 as the sinks
    return dq, dk, dv, dsinks
