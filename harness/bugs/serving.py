"""The serving path as a textbook whose every step can be swapped: the paged and varlen contracts (README,
impl/__init__.py) computed the plainest way, so a bug is one step written wrong (the catalog's paged and varlen bugs).

    paged   for each sequence b: its length L (cache_seqlens[b]); where token t lives (block_table[b, t // page_size],
            slot t % page_size); its keys and values gathered; the queries at positions L - Sq + i (bottom-right);
            the keys split into `splits` parts, each part's un-normalised (acc, l, m) = (sum_j e_j v_j, sum_j e_j,
            max_j s_j), merged by rescaling each to the common max (flash-decoding), the sink entering once
    varlen  for each sequence b: its rows cu_seqlens[b] .. cu_seqlens[b + 1] of q and of k/v, attended as above

Every step runs in float32 at least (float64 stays), so the same code in float64 is an exact reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from impl import masks
from impl.gqa import repeat_kv


def wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def part(q, k, v, qpos, kpos, *, causal, scale, window, softcap):
    """One part of the keys: q (H, Sq, d) at qpos [Sq], k/v (H, Lp, d) at kpos [Lp] -> acc (H, Sq, d), l and m
    (H, Sq, 1): the softmax's numerator times v, its sum, and the max it is taken against (-inf: no key)."""
    s = (q.to(wide(q)) @ k.to(wide(q)).transpose(-2, -1)) * scale  # (H, Sq, Lp)
    s = masks.cap(s, softcap)
    keep = torch.ones(len(qpos), len(kpos), dtype=torch.bool)  # (Sq, Lp)
    if causal:
        keep &= kpos[None, :] <= qpos[:, None]
    if window is not None:
        left, right = masks.bounds(window)
        if left is not None:
            keep &= kpos[None, :] >= qpos[:, None] - left
        if right is not None:
            keep &= kpos[None, :] <= qpos[:, None] + right
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True) if s.shape[-1] else torch.full((*s.shape[:-1], 1), float("-inf"), dtype=s.dtype)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))  # (H, Sq, Lp), 0 where masked
    return e @ v.to(e.dtype), e.sum(-1, keepdim=True), m


def merge(parts: list, sinks: torch.Tensor | None):
    """Flash-decoding's merge: each part rescaled to the common max m (acc_i exp(m_i - m)), the sink's exp(sink - m)
    once in the denominator -> out (H, Sq, d), lse (H, Sq)."""
    ms = torch.stack([p[2] for p in parts])  # (P, H, Sq, 1)
    m = ms.amax(0)
    if sinks is not None:
        m = torch.maximum(m, sinks.to(m.dtype).view(-1, 1, 1))
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(ms - safe)  # (P, H, Sq, 1): 0 for an empty part
    acc = sum(wi * p[0] for wi, p in zip(w, parts, strict=True))
    l = sum(wi * p[1] for wi, p in zip(w, parts, strict=True))  # noqa: E741 - the softmax's l, as in the papers
    if sinks is not None:
        l = l + torch.exp(sinks.to(m.dtype).view(-1, 1, 1) - safe)
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    return out, (safe + torch.log(l)).squeeze(-1)  # lse -inf where l = 0


def locate(table_row: torch.Tensor, t: torch.Tensor, page_size: int):
    """Token positions t [L] -> (block [L], slot [L]) in the cache."""
    return table_row[t // page_size].long(), t % page_size


def length(cache_seqlens: torch.Tensor, b: int) -> int:
    return int(cache_seqlens[b])


def query_pos(L: int, Sq: int) -> torch.Tensor:
    return torch.arange(L - Sq, L)  # bottom-right: the new tokens are the sequence's last


def bounds(cu: torch.Tensor, b: int) -> tuple[int, int]:
    return int(cu[b]), int(cu[b + 1])


@dataclass(frozen=True)
class Steps:
    locate: Callable = locate  # (block_table[b], t, page_size) -> block, slot
    length: Callable = length  # (cache_seqlens, b) -> the keys read
    query_pos: Callable = query_pos  # (cache_seqlens[b], Sq) -> the queries' positions
    merge: Callable = merge  # (parts, sinks) -> out, lse
    splits: int = 1  # key parts (flash-decoding); 1: the whole sequence at once
    bounds_q: Callable = bounds  # (cu_seqlens_q, b) -> rows of q
    bounds_k: Callable = bounds  # (cu_seqlens_k, b) -> rows of k, v


def attend(steps: Steps, q, k, v, qpos, kpos, *, causal, scale, window, softcap, sinks):
    """q (H, Sq, d), k/v (Hkv, L, d) -> out (H, Sq, d) in q's dtype, lse (H, Sq) float32: the keys in steps.splits
    parts, merged."""
    H, d = q.shape[0], q.shape[-1]
    masks.check_sinks(sinks, H)
    k, v = repeat_kv(k[None], H // k.shape[0])[0], repeat_kv(v[None], H // v.shape[0])[0]  # (H, L, d)
    scale = d**-0.5 if scale is None else scale
    edges = torch.linspace(0, k.shape[1], steps.splits + 1).round().long().tolist()
    parts = [part(q, k[:, a:b], v[:, a:b], qpos, kpos[a:b], causal=causal, scale=scale, window=window,
                  softcap=softcap) for a, b in zip(edges, edges[1:], strict=False)]  # fmt: skip
    out, lse = steps.merge(parts, sinks)
    return out.to(q.dtype), lse.float()


def paged(steps: Steps | None = None, **changes) -> Callable:
    """A --paged kernel computed with `steps` and `changes` swapped in."""
    steps = replace(steps or Steps(), **changes)

    def attn(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
             sinks=None):  # fmt: skip
        B, H, Sq, d = q.shape
        page = k_cache.shape[1]
        outs, lses = [], []
        for b in range(B):
            L = steps.length(cache_seqlens, b)
            t = torch.arange(L)
            blk, slot = steps.locate(block_table[b], t, page)
            k = k_cache[blk, slot].transpose(0, 1)  # (L, Hkv, d) -> (Hkv, L, d)
            v = v_cache[blk, slot].transpose(0, 1)
            qpos = steps.query_pos(int(cache_seqlens[b]), Sq)
            o, s = attend(steps, q[b], k, v, qpos, t, causal=causal, scale=scale, window=window, softcap=softcap,
                          sinks=sinks)  # fmt: skip
            outs.append(o)
            lses.append(s)
        return torch.stack(outs), torch.stack(lses)  # (B, H, Sq, d), (B, H, Sq)

    return attn


def varlen(steps: Steps | None = None, **changes) -> Callable:
    """A --varlen kernel computed with `steps` and `changes` swapped in."""
    steps = replace(steps or Steps(), **changes)

    def attn(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None,
             window=None, softcap=0.0, sinks=None):  # fmt: skip
        out = torch.zeros_like(q)  # (total_q, H, d)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))  # (H, total_q)
        for b in range(len(cu_seqlens_q) - 1):
            (qa, qb), (ka, kb) = steps.bounds_q(cu_seqlens_q, b), steps.bounds_k(cu_seqlens_k, b)
            qpos = torch.arange(kb - ka - (qb - qa), kb - ka)  # bottom-right within the rows it reads
            kpos = torch.arange(kb - ka)
            o, s = attend(steps, q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1),
                          qpos, kpos, causal=causal, scale=scale, window=window, softcap=softcap,
                          sinks=sinks)  # fmt: skip
            out[qa:qb] = o.transpose(0, 1)  # (Sq_b, H, d)
            lse[:, qa:qb] = s
        return out, lse

    return attn
