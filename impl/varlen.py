"""Packed variable-length batches: FlashAttention's varlen convention, run on the tiled core (impl/tiled.py).

A batch of sequences of different lengths is packed end to end, with no padding, and cumulative lengths say where
each one starts:

    q [total_q, H, d], k and v [total_k, Hkv, d]
    cu_seqlens_q [B + 1] int32: sequence b's queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q
    cu_seqlens_k [B + 1] int32: its keys and values, rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k and v

Each sequence attends only to its own keys (the packing is a block-diagonal mask, never materialised), and within a
sequence the causal mask is bottom-right aligned: query i of sequence b sits at position len_k_b - len_q_b + i, as the
core contract. max_seqlen_q / max_seqlen_k are FlashAttention's launch sizes (its grid); here they are only checked
against the lengths.

varlen_tiled runs the tiled core on each sequence's slices, so no token of one sequence ever meets another's, and no
padding is computed. Autograd flows through the tiled core's backward (impl/tiled.py) and the concatenation.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from impl import masks, tiled
from impl.gqa import groups


def lengths(cu_seqlens: torch.Tensor, total: int, name: str) -> list[int]:
    """cu_seqlens [B + 1] -> the B offsets' list, or ValueError: starts at 0, never decreases, ends at total."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-d tensor [B + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != total or any(a > b for a, b in pairwise(cu)):
        raise ValueError(f"{name} must rise from 0 to the packed length {total}, got {cu}")
    return cu


def varlen_tiled(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None,
                 window=None, softcap=0.0, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The varlen contract (module docstring): q [total_q, H, d], k/v [total_k, Hkv, d] -> out [total_q, H, d] in
    q's dtype, lse [H, total_q] float32 (float64 for float64 inputs). Differentiable in q, k, v and sinks."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"q must be [total_q, H, d] and k, v [total_k, Hkv, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    H, Hkv = q.shape[1], k.shape[1]
    groups(H, Hkv)
    masks.check_sinks(sinks, H)
    cq = lengths(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    ck = lengths(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1], got {len(cq)} and {len(ck)} entries")
    longest_q = max((b - a for a, b in pairwise(cq)), default=0)
    longest_k = max((b - a for a, b in pairwise(ck)), default=0)
    if longest_q > max_seqlen_q or longest_k > max_seqlen_k:
        raise ValueError(f"max_seqlen_q / max_seqlen_k = {max_seqlen_q} / {max_seqlen_k} are below the longest "
                         f"sequence's {longest_q} / {longest_k} (cu_seqlens)")  # fmt: skip

    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(pairwise(cq), pairwise(ck), strict=True):
        qb = q[q0:q1].transpose(0, 1)[None]  # (len_q, H, d) -> (1, H, len_q, d): the core's layout, a view
        kb = k[k0:k1].transpose(0, 1)[None]  # (1, Hkv, len_k, d)
        vb = v[k0:k1].transpose(0, 1)[None]
        o, s = tiled.core(qb, kb, vb, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
        outs.append(o[0].transpose(0, 1))  # (1, H, len_q, d) -> (len_q, H, d)
        lses.append(s[0])  # (H, len_q)
    wide = torch.promote_types(q.dtype, torch.float32)
    if not outs:  # B = 0: nothing packed
        return q.new_zeros(q.shape), torch.zeros(H, 0, dtype=wide, device=q.device)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)  # (total_q, H, d), (H, total_q)
