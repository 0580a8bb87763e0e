"""The tiled forward (FlashAttention-2, Algorithm 1): an online softmax over key blocks, never an S x S matrix.

For each block of queries (outer loop) we stream over blocks of keys/values (inner loop), keeping per query row a
running max m, a running sum l of exp(s - m) and an unnormalised accumulator acc = sum exp(s - m) v. When a new
block raises the max from m to m', everything accumulated so far was scaled by exp(-m) and must be rescaled by
exp(m - m') (equation 6 of the FlashAttention paper):

    m'   = max(m, rowmax(S_ij))
    P_ij = exp(S_ij - m')
    l'   = exp(m - m') l + rowsum(P_ij)
    acc' = exp(m - m') acc + P_ij V_j

and at the end out = acc / l, lse = m + log l. Outermost is a loop over groups of (batch, KV head) pairs, as many
as make a score tile of about TILE_BYTES (one for Llama-3.2-1B's shapes), so that a group's K and V stay in cache
while all its query blocks stream over them. impl/tiled.py says how the variants enter and why the loop is shaped
the way it is.
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups
from impl.tiles import (
    BLOCK_Q,
    FORWARD_BLOCK_K,
    accumulator_dtype,
    heads_per_tile,
    key_blocks,
    mask_tile,
    padding_bias,
    score_tile,
    sink_rows,
)


def flash_forward(q, k, v, attention_mask=None, *, block_q=BLOCK_Q, block_k=FORWARD_BLOCK_K, causal=True,
                  scale=None, window=None, softcap=0.0, sinks=None):  # fmt: skip
    """q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (out (B, H, Sq, d), lse (B, H, Sq) float32, natural log).

    Causal masks are bottom-right aligned (query i is key index Sk - Sq + i); attention_mask [B, Sk] marks padded
    keys with 0; window, softcap and sinks as in impl/masks.py. Rows that may attend to nothing give out = 0 and
    lse = -inf (lse = the sink logit with sinks). float64 inputs give a float64 lse (everything in float64).
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = groups(H, Hkv)
    masks.check_sinks(sinks, H)
    block_q, block_k = block_q or BLOCK_Q, block_k or FORWARD_BLOCK_K  # None: the defaults
    N, offset = B * Hkv, Sk - Sq  # (batch, KV head) pairs; query i sits at key position offset + i
    scale = d**-0.5 if scale is None else scale
    alpha = scale / softcap if softcap else scale  # softcap: the GEMM gives s / c, then tanh_ and times c
    left, right = masks.bounds(window, causal)
    wide = accumulator_dtype(q.dtype)
    same = q.dtype == wide  # float32 / float64: the scores come straight out of one baddbmm
    kT = k.reshape(N, Sk, d).transpose(1, 2)  # (B*Hkv, d, Sk)
    vN = v.reshape(N, Sk, d)  # (B*Hkv, Sk, d)
    qN = q.reshape(N, g, Sq, d)  # (B*Hkv, g, Sq, d): query heads grouped by their KV head
    pad = padding_bias(attention_mask, Hkv, wide, q.device)  # (B*Hkv, 1, Sk) or None
    sink = sink_rows(sinks, B, Hkv, g, min(block_q, Sq), wide, q.device) if sinks is not None else None
    out = torch.empty(B, H, Sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=wide, device=q.device)
    outN, lseN = out.view(N, g, Sq, d), lse.view(N, g, Sq)  # (B*Hkv, g, Sq, ...) views
    biases = {}  # the edge biases of this call (tiles.mask_tile): the same tiles cross the same edges
    n = heads_per_tile(N, g * block_q, block_k, torch.finfo(wide).bits // 8)

    for h0 in range(0, N, n):  # a group of (batch, KV head) pairs: its K and V stay in cache across query blocks
        hs = slice(h0, min(h0 + n, N))
        padh = pad[hs] if pad is not None else None  # (n, 1, Sk)
        for i0 in range(0, Sq, block_q):
            i1 = min(i0 + block_q, Sq)
            bq = i1 - i0
            qi = qN[hs, :, i0:i1].reshape(-1, g * bq, d)  # (n, g*bq, d): a copy of this block's queries
            if sink is None:
                m = torch.full(qi.shape[:2] + (1,), float("-inf"), dtype=wide, device=q.device)  # running max
                l = torch.zeros(qi.shape[:2] + (1,), dtype=wide, device=q.device)  # running sum
            else:  # the sink is the first logit seen: the max starts at it, the sum at exp(sink - sink) = 1
                m = sink[hs].view(-1, g, sink.shape[1] // g, 1)[:, :, :bq].reshape(-1, g * bq, 1)  # (n, g*bq, 1)
                l = torch.isfinite(m).to(wide)  # a -inf sink adds nothing
            acc = torch.zeros(qi.shape, dtype=wide, device=q.device)  # (n, g*bq, d) unnormalised output

            for j0, j1 in key_blocks(i0, i1, offset, Sk, left, right, block_k):  # outside the window: skipped
                s = score_tile(qi, kT[hs, :, j0:j1], alpha, same)  # (n, g*bq, bk)
                if softcap:
                    s.tanh_().mul_(softcap)  # c * tanh(s / c), before the masks as in Gemma 2
                mask_tile(s, i0, i1, j0, j1, offset, left, right, padh, g, biases)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (n, g*bq, 1)
                shift = m_new.clamp(min=torch.finfo(wide).min)  # a row with nothing seen so far: any finite shift
                p = s.sub_(shift).exp_()  # exp(s - m') (n, g*bq, bk), in place of the scores
                rescale = torch.exp(m - shift)  # exp(m - m'): rescales what was accumulated (eq. 6)
                l.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))
                acc.mul_(rescale)
                if same:
                    acc.baddbmm_(p, vN[hs, j0:j1])  # acc += p @ v_j
                else:
                    acc.add_(torch.bmm(p.to(v.dtype), vN[hs, j0:j1]).float())
                m = m_new

            acc.div_(torch.where(l > 0, l, 1.0))  # fully masked rows: acc = 0 -> 0
            outN[hs, :, i0:i1] = acc.view(-1, g, bq, d)  # (n, g, bq, d), cast to q's dtype
            lseN[hs, :, i0:i1] = (m + torch.log(l)).view(-1, g, bq)  # -inf where l = 0

    return out, lse
