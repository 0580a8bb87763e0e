"""FlashAttention-2-style attention in pure PyTorch, forward and backward: tiles, never an S x S matrix.

Forward. For each block of queries (outer loop) we stream over blocks of keys/values (inner loop), keeping per query
row a running max m, a running sum l of exp(s - m) and an unnormalised accumulator acc = sum exp(s - m) v.
When a new block raises the max from m to m', everything accumulated so far was scaled by exp(-m) and must be
rescaled by exp(m - m') (equation 6 of the FlashAttention paper):

    m'   = max(m, rowmax(S_ij))
    P_ij = exp(S_ij - m')
    l'   = exp(m - m') l + rowsum(P_ij)
    acc' = exp(m - m') acc + P_ij V_j

and at the end out = acc / l, lse = m + log l.

Backward (FlashAttention-2, Algorithm 2). The forward keeps only out and lse; the backward recomputes each
probability tile from lse, P_ij = exp(S_ij - lse_i), which is already normalised. With D_i = rowsum(dO_i * O_i):

    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)         (the softmax Jacobian: dS = P * (dP - rowsum(P * dP)), and
                                          rowsum(P * dP) = rowsum(dO * O) = D, a d-wide sum instead of a bk-wide one)
    dQ_i += scale dS_ij K_j
    dK_j += scale dS_ij^T Q_i

The lse output is differentiable too, for free: d lse_i / d S_ij = P_ij, so a gradient dlse adds dlse_i P_ij to
dS_ij, which is the same formula with D_i - dlse_i in place of D_i. The loops are the forward's (query blocks
outer): dQ_i is accumulated over the key blocks and written once, dK and dV are accumulated in full-size buffers
(they are the size of k and v). Causal tiles above the diagonal are skipped and the diagonal tiles masked as in the
forward; rows that see no key (lse = -inf) use lse = +inf, so their P is 0 and their gradient 0, never NaN.
`FlashAttention` (a torch.autograd.Function) ties the two passes together; `core` uses it only when a gradient is
wanted, so a forward under no_grad (or with inputs that need no gradient) is flash_forward itself.

Why it is shaped the way it is (each point was measured; docs/bench.md has the resulting times):
- The 1/sqrt(d) scale is applied inside the score matmul (baddbmm's alpha), so no per-tile scaling pass, and
  the scores round exactly as transformers' (q k^T) * scale do; the backward recomputes them the same way, so its
  P uses the very scores the forward's lse was taken over. dQ and dK take the scale as baddbmm_'s alpha too.
- exp(x) is computed as exp2(x log2(e)), which is cheaper here, and the product is taken after the max (forward)
  or the lse (backward) is subtracted: folding log2(e) into q instead would add an error proportional to |score|
  to every exponent, enough to fail the x50-scaled scores scenario's 1e-3 tolerance.
- Causal: key blocks entirely above the diagonal are skipped, only blocks that cross it are masked. Masks are
  added as 0 / -inf biases (an add over the tile is much cheaper than masked_fill_ here), the diagonal one built
  from two aranges per tile: nothing is cached by shape, so the code has no Python state keyed by tile sizes.
- GQA: the g query heads of a KV head are stacked into one block of g*bq rows, so each K/V tile is read once
  per group and never repeated; the tile matmuls are batched over the KV heads. In the backward the stacking sums
  dK and dV over the g heads inside the matmul (the reduction runs over all g*bq rows).
- In place: the tile is exponentiated where it lies and the products are added into their accumulators by
  baddbmm_, so a tile costs one new buffer in the forward and two (P and dS) in the backward.
Half-precision inputs: the tile matmuls run in the input dtype, m, l, acc, D, dS and the dQ/dK/dV accumulators in
float32 (P and dS are rounded to the input dtype for their matmuls, as FlashAttention does); one exception, dP = dO V^T
takes the half values in float32 (step 3 of flash_backward says why). Gradients are returned in the input dtype.
float64 inputs are computed in float64 throughout (gradcheck needs it), lse included.
Memory: forward, one (B*Hkv, g*bq, bk) float32 tile plus the output; backward, two such tiles plus dq, dk, dv
(float32 buffers for dk, dv when the inputs are half) and one query block of q, dO and dQ.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from impl.gqa import groups
from impl.projection import heads, output, project_qkv

BLOCK_Q = 128  # query rows per tile (times g, the query heads per KV head)
BLOCK_K = 256  # keys per tile
LOG2E = math.log2(math.e)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64; float32 and half precision in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def padding_bias(attention_mask, dtype, device):
    """[B, Sk] of 1/0 -> (B, 1, 1, Sk) additive bias: 0 for a key, -inf for padding (None: no padding)."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Sk)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def diagonal_bias(i0, i1, j0, j1, offset, dtype, device):
    """(bq, bk) additive causal bias for queries i0..i1-1 (key positions offset + i) and keys j0..j1-1."""
    above = torch.arange(j0, j1, device=device) > torch.arange(offset + i0, offset + i1, device=device)[:, None]
    return torch.zeros(above.shape, dtype=dtype, device=device).masked_fill_(above, float("-inf"))  # (bq, bk)


def flash_forward(q, k, v, attention_mask=None, *, block_q=BLOCK_Q, block_k=BLOCK_K, causal=True, scale=None):
    """q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (out (B, H, Sq, d), lse (B, H, Sq) float32, natural log).

    Causal masks are bottom-right aligned (query i is key index Sk - Sq + i); attention_mask [B, Sk] marks
    padded keys with 0. Rows that may attend to nothing give out = 0 and lse = -inf. float64 inputs give a float64
    lse (everything is computed in float64).
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = groups(H, Hkv)
    scale = d**-0.5 if scale is None else scale
    offset = Sk - Sq
    wide = accumulator_dtype(q.dtype)
    same = q.dtype == wide  # float32 / float64: the scores come straight out of one baddbmm
    pad = padding_bias(attention_mask, wide, q.device)  # (B, 1, 1, Sk) or None
    qg = q.unflatten(1, (Hkv, g))  # (B, Hkv, g, Sq, d): query heads grouped by their KV head (a view)
    kT = k.reshape(B * Hkv, Sk, d).transpose(1, 2)  # (B*Hkv, d, Sk)
    vv = v.reshape(B * Hkv, Sk, d)  # (B*Hkv, Sk, d)
    out = torch.empty_like(q)  # (B, H, Sq, d)
    lse = torch.empty(B, H, Sq, dtype=wide, device=q.device)

    for i0 in range(0, Sq, block_q):
        i1 = min(i0 + block_q, Sq)
        bq, R = i1 - i0, g * (i1 - i0)
        qi = qg[:, :, :, i0:i1].reshape(B * Hkv, R, d)  # (B*Hkv, g*bq, d): a copy of this block's queries
        m = torch.full((B * Hkv, R, 1), float("-inf"), dtype=wide, device=q.device)  # running max
        l = torch.zeros(B * Hkv, R, 1, dtype=wide, device=q.device)  # running sum
        acc = torch.zeros(B * Hkv, R, d, dtype=wide, device=q.device)  # unnormalised output
        last = Sk if not causal else min(Sk, offset + i1)  # keys beyond the block's last query are never seen

        for j0 in range(0, last, block_k):
            j1 = min(j0 + block_k, last)
            if same:  # (B*Hkv, g*bq, bk) scores: scale * q k^T in one GEMM (beta=0: the first argument is unused)
                s = torch.baddbmm(qi.new_empty(()), qi, kT[:, :, j0:j1], beta=0, alpha=scale)
            else:
                s = torch.bmm(qi, kT[:, :, j0:j1]).float().mul_(scale)
            if causal and j1 - 1 > offset + i0:  # this block crosses the diagonal: mask it
                s.view(-1, g, bq, j1 - j0).add_(diagonal_bias(i0, i1, j0, j1, offset, wide, q.device))  # each head
            if pad is not None:
                s.view(B, Hkv, R, j1 - j0).add_(pad[..., j0:j1])

            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B*Hkv, g*bq, 1)
            shift = torch.where(torch.isfinite(m_new), m_new, 0.0)  # all -inf so far: no shift
            p = s.sub_(shift).mul_(LOG2E).exp2_()  # exp(s - m') (B*Hkv, g*bq, bk), in place of the scores
            alpha = torch.exp2((m - shift) * LOG2E)  # exp(m - m'): rescales what was accumulated (eq. 6)
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(alpha)
            if p.dtype == v.dtype:
                acc.baddbmm_(p, vv[:, j0:j1])  # acc += p @ v_j
            else:
                acc.add_(torch.bmm(p.to(v.dtype), vv[:, j0:j1]).float())
            m = m_new

        acc.div_(torch.where(l > 0, l, 1.0))  # fully masked rows: acc = 0 -> 0
        out[:, :, i0:i1] = acc.view(B, Hkv, g, bq, d).reshape(B, H, bq, d).to(q.dtype)  # (B, H, bq, d)
        lse[:, :, i0:i1] = (m + torch.log(l)).view(B, H, bq)  # -inf where l = 0

    return out, lse


def flash_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    dlse=None,
    attention_mask=None,
    *,
    block_q=BLOCK_Q,
    block_k=BLOCK_K,
    causal=True,
    scale=None,
    needs=(True, True, True),
):
    """Gradients of (out, lse) = flash_forward(q, k, v, ...): (dq, dk, dv) in the inputs' dtypes.

    out, lse are the forward's results, dout (B, H, Sq, d) and dlse (B, H, Sq) or None the incoming gradients;
    needs says which of dq, dk, dv to compute (the others are returned as None and their matmuls skipped).
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = groups(H, Hkv)
    N = B * Hkv  # the batch of every tile matmul
    scale = d**-0.5 if scale is None else scale
    offset = Sk - Sq
    wide = accumulator_dtype(q.dtype)
    same = q.dtype == wide  # float32 / float64: no casts around the tile matmuls
    need_q, need_k, need_v = needs
    pad = padding_bias(attention_mask, wide, q.device)  # (B, 1, 1, Sk) or None
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
        dqi = torch.zeros(N, R, d, dtype=wide, device=q.device) if need_q else None  # dQ_i accumulator
        last = Sk if not causal else min(Sk, offset + i1)  # keys beyond the block's last query are never seen

        for j0 in range(0, last, block_k):
            j1 = min(j0 + block_k, last)
            # 1. P_ij = exp(scale Q_i K_j^T - lse_i), scores exactly as in the forward, masked the same way
            if same:
                s = torch.baddbmm(qi.new_empty(()), qi, kk[:, j0:j1].transpose(1, 2), beta=0, alpha=scale)
            else:
                s = torch.bmm(qi, kk[:, j0:j1].transpose(1, 2)).float().mul_(scale)  # (B*Hkv, g*bq, bk)
            if causal and j1 - 1 > offset + i0:  # this block crosses the diagonal: mask it
                s.view(-1, g, bq, j1 - j0).add_(diagonal_bias(i0, i1, j0, j1, offset, wide, q.device))  # each head
            if pad is not None:
                s.view(B, Hkv, R, j1 - j0).add_(pad[..., j0:j1])
            p = s.sub_(li).mul_(LOG2E).exp2_()  # (B*Hkv, g*bq, bk), in place of the scores
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
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """(out, lse) = flash_forward(q, k, v, ...), differentiable in q, k, v through flash_backward.

    Saves q, k, v, out and lse (O(S d) memory, nothing S x S). No gradient for attention_mask, causal, scale or
    the block sizes. Twice differentiable it is not (once_differentiable: a second backward raises).
    """

    @staticmethod
    def forward(ctx, q, k, v, attention_mask, causal, scale, block_q, block_k):
        opts = dict(block_q=block_q, block_k=block_k, causal=causal, scale=scale)
        out, lse = flash_forward(q, k, v, attention_mask, **opts)  # runs without recording: in-place ops are fine
        ctx.save_for_backward(q, k, v, out, lse, attention_mask)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attention_mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 8
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = flash_backward(
            q, k, v, out, lse, dout, dlse, attention_mask, needs=ctx.needs_input_grad[:3], **ctx.opts
        )
        return dq, dk, dv, None, None, None, None, None


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """The core contract: returns (out (B, H, Sq, d), lse (B, H, Sq) float32), both differentiable in q, k, v.

    The autograd Function is used only when a gradient is wanted (grad mode on and q, k or v requiring grad);
    otherwise this is flash_forward itself, nothing added. The block sizes apply to both passes. float64 inputs give
    a float64 lse.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttention.apply(q, k, v, attention_mask, causal, scale, block_q, block_k)
    return flash_forward(q, k, v, attention_mask, block_q=block_q, block_k=block_k, causal=causal, scale=scale)


def attention(x, weights, *, config, position_ids, attention_mask=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """The plug-in contract, with configurable block sizes; differentiable (projections through autograd)."""
    groups(*heads(config)[:2])
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2
    ctx, _ = core(q, k, v, attention_mask=attention_mask, block_q=block_q, block_k=block_k)  # (B, H, S, d)
    return output(ctx, weights)  # (B, S, D)
