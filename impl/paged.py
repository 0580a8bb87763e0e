"""Attention over a paged KV cache, in PyTorch: the textbook (`paged_naive`) and flash-decoding (`paged_split`).

A serving engine keeps each sequence's keys and values in fixed-size pages of one shared pool (vLLM's PagedAttention),
so the cache never has to be contiguous or resized as a sequence grows:

    k_cache, v_cache  [num_blocks, page_size, Hkv, d]   the pool: block n, slot s holds one token's K (V) heads
    block_table       [B, max_blocks] int32            token t of sequence b is at block block_table[b, t // page_size],
                                                         slot t % page_size
    cache_seqlens     [B] int32                         sequence b owns tokens 0 .. cache_seqlens[b] - 1

q [B, H, Sq, d] holds each sequence's last Sq tokens (Sq = 1: a decode step; Sq > 1: a chunk of prefill), already
written to the cache, so query i of sequence b sits at position p = cache_seqlens[b] - Sq + i: bottom-right aligned,
as the core contract (impl/__init__.py). Slots no sequence owns hold anything (the harness fills them with NaN):
both kernels here compute the (block, slot) of exactly the tokens 0 .. cache_seqlens[b] - 1 and read only those.

- paged_naive gathers each sequence's keys and values into dense [Hkv, L, d] tensors and runs the textbook softmax
  (impl/masks.py's math: causal, window, softcap, sinks) on them.
- paged_split is flash-decoding (Dao et al., 2023): a decode step has one query row per head, too little work to
  fill a GPU, so the keys are cut into num_splits contiguous parts processed independently (in parallel, on a GPU),
  each giving a partial result normalised over its own keys, out_i, and its log-sum-exp, lse_i. They merge exactly:

      lse = log(exp(sink) + sum_i exp(lse_i))        out = sum_i exp(lse_i - lse) out_i

  because out_i = sum_{j in part i} exp(s_j - lse_i) v_j, so exp(lse_i - lse) out_i is part i's share of the
  softmax over all keys. The sink (a logit with no value) enters the denominator once, in the merge, not per part.

Both compute in float32 (float64 for float64 inputs) from the scores to the output, which is returned in q's dtype;
lse [B, H, Sq] is float32 (float64 for float64 inputs), -inf (or the sink) for a row that sees no key, whose out is 0.
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups

NUM_SPLITS = 4  # paged_split's default: a part per SM group on a GPU; here, enough to exercise the merge


def check(q, k_cache, v_cache, block_table, cache_seqlens) -> list[int]:
    """Shapes and values of the paged contract, or ValueError naming the problem; returns cache_seqlens as ints.

    Every owned token must have a page: cache_seqlens[b] <= max_blocks * page_size, and the table entries of
    sequence b's pages (the first cdiv(cache_seqlens[b], page_size)) must name blocks of the pool."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, H, Sq, d] and k_cache [num_blocks, page_size, Hkv, d], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")  # fmt: skip
    B, H, Sq, d = q.shape
    num_blocks, page, Hkv = k_cache.shape[:3]
    groups(H, Hkv)
    if k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [num_blocks, page_size, Hkv, d={d}], got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")  # fmt: skip
    if block_table.dim() != 2 or block_table.shape[0] != B or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"block_table must be [B={B}, max_blocks] and cache_seqlens [B={B}], got "
                         f"{tuple(block_table.shape)}, {tuple(cache_seqlens.shape)}")  # fmt: skip
    lens = [int(n) for n in cache_seqlens.tolist()]
    max_blocks = block_table.shape[1]
    for b, n in enumerate(lens):
        if not 0 <= n <= max_blocks * page:
            raise ValueError(f"cache_seqlens[{b}] = {n} is outside 0 .. max_blocks * page_size = {max_blocks * page}")
        pages = block_table[b, : -(-n // page)]
        if pages.numel() and not (0 <= int(pages.min()) and int(pages.max()) < num_blocks):
            raise ValueError(f"block_table[{b}] names a block outside 0 .. {num_blocks - 1} among its first "
                             f"{pages.numel()} pages")  # fmt: skip
    return lens


def gather(cache: torch.Tensor, table_row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The pool's entries for `tokens` of one sequence: cache [num_blocks, P, Hkv, d], table_row [max_blocks],
    tokens (n,) int64 -> (Hkv, n, d). Reads exactly those tokens' slots, never the rest of their pages."""
    P = cache.shape[1]
    blocks = table_row.to(cache.device, torch.int64)[tokens // P]  # (n,): the block holding each token
    return cache[blocks, tokens % P].transpose(0, 1)  # (n, Hkv, d) -> (Hkv, n, d)


def attend(q, k, v, allowed, *, scale: float, softcap: float, sink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's softmax attention over some of its keys, in q's (wide) dtype.

    q (H, Sq, d); k, v (Hkv, n, d); allowed (Sq, n) bool; sink None or (H, 1) -> out (H, Sq, d), lse (H, Sq).
    The g = H / Hkv query heads of a KV head are stacked as g * Sq rows against it, so K/V are never repeated.
    """
    H, Sq, d = q.shape
    Hkv, n = k.shape[0], k.shape[1]
    g = H // Hkv
    if n == 0:  # no keys (an empty part, an empty sequence): out 0, lse -inf or the sink (no reduction over nothing)
        lse = torch.full((H, Sq), float("-inf"), dtype=q.dtype, device=q.device)
        return torch.zeros_like(q), lse if sink is None else torch.maximum(lse, sink)
    s = q.reshape(Hkv, g * Sq, d) @ k.transpose(1, 2)  # (Hkv, g*Sq, n): query head h = j*g + r uses KV head j
    s = masks.cap(s.view(H, Sq, n) * scale, softcap)  # (H, Sq, n): scale, then the cap, then the mask (Gemma 2)
    s = s.masked_fill(~allowed, float("-inf"))  # allowed (Sq, n) broadcasts over heads
    logits = s if sink is None else torch.cat([s, sink[:, :, None].expand(H, Sq, 1)], dim=-1)  # (H, Sq, n [+ 1])
    lse = torch.logsumexp(logits, dim=-1)  # (H, Sq): -inf where a row sees nothing (and no sink)
    probs = masks.masked_softmax(s, allowed, None if sink is None else sink[:, :, None])  # (H, Sq, n), 0-rows safe
    out = probs.view(Hkv, g * Sq, n) @ v  # (Hkv, g*Sq, d)
    return out.view(H, Sq, d), lse  # (H, Sq, d)


def _setup(q, k_cache, v_cache, block_table, cache_seqlens, scale, sinks):
    """Checked lengths, the wide dtype, the scale and the sinks as (H, 1) wide logits (or None)."""
    lens = check(q, k_cache, v_cache, block_table, cache_seqlens)
    masks.check_sinks(sinks, q.shape[1])
    wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sink = None if sinks is None else sinks.to(q.device, wide).view(-1, 1)  # (H, 1)
    return lens, wide, scale, sink


def paged_naive(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None,
                softcap=0.0, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The paged contract (module docstring): per sequence, gather its L keys and values, then dense attention.

    q [B, H, Sq, d]; k_cache, v_cache [num_blocks, page_size, Hkv, d] -> out [B, H, Sq, d] (q's dtype),
    lse [B, H, Sq] float32 (float64 for float64 inputs)."""
    lens, wide, scale, sink = _setup(q, k_cache, v_cache, block_table, cache_seqlens, scale, sinks)
    B, H, Sq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, dtype=wide, device=q.device)
    for b, L in enumerate(lens):
        tokens = torch.arange(L, device=q.device)  # the sequence's own tokens 0 .. L - 1, nothing past them
        k = gather(k_cache, block_table[b], tokens).to(wide)  # (Hkv, L, d)
        v = gather(v_cache, block_table[b], tokens).to(wide)
        allowed = masks.build(Sq, L, device=q.device, is_causal=causal, window=window)[0, 0]  # (Sq, L) bottom-right
        o, lse[b] = attend(q[b].to(wide), k, v, allowed, scale=scale, softcap=softcap, sink=sink)
        out[b] = o  # (H, Sq, d), cast to q's dtype
    return out, lse


def split_bounds(start: int, stop: int, num_splits: int) -> list[tuple[int, int]]:
    """[start, stop) cut into num_splits contiguous parts as equal as integers allow; a part may be empty."""
    n = stop - start
    return [(start + n * i // num_splits, start + n * (i + 1) // num_splits) for i in range(num_splits)]


def merge(outs: torch.Tensor, lses: torch.Tensor, sink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial results -> the whole softmax's: outs (n, H, Sq, d), lses (n, H, Sq), sink None or (H, 1).

    lse = logsumexp over the parts (and the sink, once); out = sum_i exp(lse_i - lse) out_i. A part that saw no
    key has lse_i = -inf: weight 0. A row no part saw (and no sink) has lse = -inf: out 0, not exp(-inf + inf)."""
    parts = lses if sink is None else torch.cat([lses, sink.expand_as(lses[0])[None]])  # (n [+ 1], H, Sq)
    lse = torch.logsumexp(parts, dim=0)  # (H, Sq)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # any finite value where nothing was seen
    weights = torch.exp(lses - safe)  # (n, H, Sq): each part's share of the denominator; 0 for lse_i = -inf
    return (weights[..., None] * outs).sum(dim=0), lse  # (H, Sq, d), (H, Sq)


def paged_split(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None,
                softcap=0.0, sinks=None, num_splits=NUM_SPLITS) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The paged contract, flash-decoding: per sequence, the keys some query may see cut into num_splits
    contiguous parts, each attended to on its own (its slice of the causal/window mask, no sink), merged by lse
    (`merge`). Returns out [B, H, Sq, d] (q's dtype), lse [B, H, Sq] float32 (float64 for float64 inputs)."""
    if int(num_splits) < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    lens, wide, scale, sink = _setup(q, k_cache, v_cache, block_table, cache_seqlens, scale, sinks)
    B, H, Sq, d = q.shape
    left, right = masks.bounds(window, causal)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, dtype=wide, device=q.device)
    for b, L in enumerate(lens):
        allowed = masks.build(Sq, L, device=q.device, is_causal=causal, window=window)[0, 0]  # (Sq, L)
        # the keys some query sees: from the first query's left edge (position L - Sq, minus left) to the last one's
        # right edge (position L - 1, plus right, exclusive: + 1); no part is spent outside them
        start = 0 if left is None else min(max(L - Sq - left, 0), L)
        stop = L if right is None else min(max(L + right, start), L)
        outs, lses = [], []
        for j0, j1 in split_bounds(start, stop, int(num_splits)):
            tokens = torch.arange(j0, j1, device=q.device)  # this part's tokens: only they are read
            k = gather(k_cache, block_table[b], tokens).to(wide)  # (Hkv, j1 - j0, d)
            v = gather(v_cache, block_table[b], tokens).to(wide)
            o, s = attend(q[b].to(wide), k, v, allowed[:, j0:j1], scale=scale, softcap=softcap)
            outs.append(o)  # (H, Sq, d), normalised over this part's keys (0 for rows that see none of them)
            lses.append(s)  # (H, Sq)
        o, lse[b] = merge(torch.stack(outs), torch.stack(lses), sink)  # (num_splits, H, Sq[, d]) -> (H, Sq[, d])
        out[b] = o
    return out, lse
