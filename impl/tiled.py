"""FlashAttention-2-style forward in pure PyTorch: tiles and an online softmax, never an S x S matrix.

For each block of queries (outer loop) we stream over blocks of keys/values (inner loop), keeping per query row
a running max m, a running sum l of exp(s - m) and an unnormalised accumulator acc = sum exp(s - m) v.
When a new block raises the max from m to m', everything accumulated so far was scaled by exp(-m) and must be
rescaled by exp(m - m') (equation 6 of the FlashAttention paper):

    m'   = max(m, rowmax(S_ij))
    P_ij = exp(S_ij - m')
    l'   = exp(m - m') l + rowsum(P_ij)
    acc' = exp(m - m') acc + P_ij V_j

and at the end out = acc / l, lse = m + log l. Causal: key blocks entirely above the diagonal are skipped,
only blocks that cross it are masked. GQA: the g query heads of a KV head are stacked into one block of g*bq
rows, so each K/V tile is read once per group and never repeated. Half-precision inputs: the tile matmuls run in
the input dtype, m, l and acc in float32. Memory: O(B * H * bq * bk) for a tile, plus the output.
"""

from __future__ import annotations

import torch

from impl.gqa import groups
from impl.projection import heads, output, project_qkv

BLOCK_Q = 128
BLOCK_K = 128


def flash_forward(q, k, v, attention_mask=None, *, block_q=BLOCK_Q, block_k=BLOCK_K, causal=True):
    """q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (out (B, H, Sq, d), lse (B, H, Sq) float32).

    Causal masks are bottom-right aligned (query i is key index Sk - Sq + i); attention_mask [B, Sk] marks
    padded keys with 0. Rows that may attend to nothing give out = 0 and lse = -inf.
    """
    B, H, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = groups(H, Hkv)
    scale = d**-0.5
    offset = Sk - Sq
    keep = attention_mask.bool() if attention_mask is not None else None  # (B, Sk)
    qg = q.view(B, Hkv, g, Sq, d)  # (B, Hkv, g, Sq, d): query heads grouped by their KV head
    out = torch.empty_like(q)  # (B, H, Sq, d)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)

    for i0 in range(0, Sq, block_q):
        i1 = min(i0 + block_q, Sq)
        bq = i1 - i0
        qi = qg[:, :, :, i0:i1].reshape(B, Hkv, g * bq, d)  # (B, Hkv, g*bq, d)
        m = torch.full((B, Hkv, g * bq, 1), float("-inf"), device=q.device)  # running max, float32
        l = torch.zeros(B, Hkv, g * bq, 1, device=q.device)  # running sum
        acc = torch.zeros(B, Hkv, g * bq, d, device=q.device)  # unnormalised output, float32
        last = Sk if not causal else min(Sk, offset + i1)  # keys beyond the block's last query are never seen

        for j0 in range(0, last, block_k):
            j1 = min(j0 + block_k, last)
            s = (qi @ k[:, :, j0:j1].transpose(-2, -1)).float()  # (B, Hkv, g*bq, bk)
            s *= scale
            if causal and j1 - 1 > offset + i0:  # this block crosses the diagonal: mask it
                qpos = torch.arange(i0, i1, device=q.device)[:, None] + offset  # (bq, 1)
                kpos = torch.arange(j0, j1, device=q.device)[None, :]  # (1, bk)
                above = (kpos > qpos).repeat(g, 1)  # (g*bq, bk): the same rows for each head of the group
                s.masked_fill_(above, float("-inf"))
            if keep is not None:
                s.masked_fill_(~keep[:, None, None, j0:j1], float("-inf"))

            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, Hkv, g*bq, 1)
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # all -inf so far: no shift
            p = torch.exp(s - shift)  # (B, Hkv, g*bq, bk)
            alpha = torch.exp(m - shift)  # rescales what was accumulated under the old max (eq. 6)
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(alpha).add_((p.to(v.dtype) @ v[:, :, j0:j1]).float())  # (B, Hkv, g*bq, d)
            m = m_new

        o = acc / torch.where(l > 0, l, torch.ones_like(l))  # fully masked rows: acc = 0 -> 0
        out[:, :, i0:i1] = o.view(B, Hkv, g, bq, d).reshape(B, H, bq, d).to(q.dtype)  # (B, H, bq, d)
        lse[:, :, i0:i1] = (m + torch.log(l)).view(B, H, bq)  # -inf where l = 0

    return out, lse


def core(q, k, v, attention_mask=None, *, block_q=BLOCK_Q, block_k=BLOCK_K):
    return flash_forward(q, k, v, attention_mask, block_q=block_q, block_k=block_k)[0]


def attention(x, weights, *, config, position_ids, attention_mask=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """The plug-in contract, with configurable block sizes."""
    groups(*heads(config)[:2])
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2
    ctx = core(q, k, v, attention_mask, block_q=block_q, block_k=block_k)  # (B, H, S, d)
    return output(ctx, weights)  # (B, S, D)
