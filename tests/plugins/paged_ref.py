"""Reference kernels of the serving contracts, written from the contracts' text with torch only (no harness, no
transformers), and bugs in them (tests/test_paged_contract.py). Each is a plain function meeting its contract, so
the bugs can move into the catalog (harness/bugs/) as they are.

    attn                --paged: each sequence's keys gathered through block_table to cache_seqlens, textbook
    split               --paged: flash-decoding, the keys in NUM_SPLITS parts, each part's (out, lse), merged by lse
    varlen              --varlen: each sequence sliced by cu_seqlens, textbook
    wrong_shape         --paged: drops the last channel (a contract fault)
    bugs (paged)        table_ignored (pages assumed contiguous from the first), page_off_by_one (logical page
                        t // page_size + 1), slot_wraps_early and boundary_next_page (a page's last token read from
                        its first slot, or from the next page's block), seqlens_plus_one, seqlens_minus_one,
                        seqlens_ignored (every sequence to the longest), split_no_rescale (parts weighted by their
                        local sums, never brought to one max), split_average (parts averaged), query_at_zero (the
                        new queries at positions 0 .. Sq - 1)
    bugs (varlen)       varlen_neighbour (a sequence sees the previous one's keys), cu_seqlens_off_by_one (each
                        sequence's keys end one past cu_seqlens_k[b + 1])
"""

from __future__ import annotations

import torch

NUM_SPLITS = 4


def dense(q, k, v, *, causal, scale, window, softcap, sinks, offset=None, keys_from=0):
    """q (1, H, Sq, d), k, v (1, Hkv, n, d) -> (out (1, H, Sq, d) float, lse (1, H, Sq), row max (1, H, Sq)).
    offset: the position of query 0 (default n - Sq, bottom-right); keys_from: the position of key 0 (a split's
    part starts there). Sinks join the denominator once, here."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, Sq, d = q.shape[1], q.shape[2], q.shape[3]
    n = k.shape[2]
    g = H // k.shape[1]
    k, v = k.to(wide).repeat_interleave(g, 1), v.to(wide).repeat_interleave(g, 1)  # (1, H, n, d)
    s = (q.to(wide) @ k.transpose(-2, -1)) * (d**-0.5 if scale is None else scale)  # (1, H, Sq, n)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    last = keys_from + n if offset is None else None
    p = torch.arange(Sq)[:, None] + (last - Sq if offset is None else offset)  # (Sq, 1) query positions
    j = torch.arange(n)[None, :] + keys_from  # (1, n) key positions
    keep = (j <= p) if causal else torch.ones(Sq, n, dtype=torch.bool)
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep = keep & (j >= p - left)
        if right is not None and right >= 0:
            keep = keep & (j <= p + right)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(wide).view(1, H, 1, 1).expand(1, H, Sq, 1)], -1)
    lse = torch.logsumexp(s, -1)  # (1, H, Sq); -inf where a row sees nothing
    m = s.amax(-1) if s.shape[-1] else torch.full((1, H, Sq), float("-inf"), dtype=wide)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :n]  # (1, H, Sq, n): the sink's column has no value
    return w @ v, lse, m


def address(table, b: int, t, P: int, N: int):
    """(blocks, slots) of tokens t of sequence b: the contract's."""
    return table[b, t // P], t % P


def gather(k_cache, v_cache, block_table, b: int, n: int, where=address):
    """(k, v) (1, Hkv, n, d) of sequence b's first n tokens, each at where(table, b, t, page_size, num_blocks)."""
    blocks, slots = where(block_table, b, torch.arange(n), k_cache.shape[1], k_cache.shape[0])
    k, v = k_cache[blocks.long(), slots], v_cache[blocks.long(), slots]  # (n, Hkv, d)
    return k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None]


def paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, window, softcap, sinks, *,
               length=None, where=address, top_left=False, attend=None):  # fmt: skip
    """The paged contract, each sequence on its own, with the hooks the bugs bend: length(n, lens) the keys read,
    where (address's signature) each token's slot, top_left the queries at 0 .. Sq - 1, attend the core."""
    lens = [int(n) for n in cache_seqlens]
    outs, lses = [], []
    for b, n in enumerate(lens):
        n = length(n, lens) if length is not None else n
        k, v = gather(k_cache, v_cache, block_table, b, n, where)
        kw = {"causal": causal, "scale": scale, "window": window, "softcap": softcap, "sinks": sinks}
        o, lse = (attend or _whole)(q[b : b + 1], k, v, offset=0 if top_left else None, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs).to(q.dtype), torch.cat(lses).float()


def _whole(q, k, v, **kw):
    o, lse, _ = dense(q, k, v, **kw)
    return o, lse


def attn(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
         sinks=None):  # fmt: skip
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, window, softcap, sinks)


def wrong_shape(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return attn(q, k_cache, v_cache, block_table=block_table, cache_seqlens=cache_seqlens, causal=causal,
                scale=scale)[0][..., :-1]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# flash-decoding: the keys in parts, each part's partial result, merged


def _parts(n: int) -> list[tuple[int, int]]:
    size = -(-n // NUM_SPLITS) if n else 1
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _split_with(merge):
    def attend(q, k, v, *, offset=None, sinks=None, **kw):
        n, Sq = k.shape[2], q.shape[2]
        offset = n - Sq if offset is None else offset
        parts = [dense(q, k[:, :, a:z], v[:, :, a:z], offset=offset, keys_from=a, sinks=None, **kw)
                 for a, z in _parts(n)] or [dense(q, k, v, offset=offset, sinks=None, **kw)]  # fmt: skip
        out, lse = merge(parts)
        if sinks is not None:  # the sink enters once, after the merge
            s = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
            both = torch.logaddexp(lse, s)
            out, lse = out * torch.exp(lse - both).nan_to_num(0.0)[..., None], both
        return out, lse

    return attend


def merge_lse(parts):
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    w = [torch.exp(p[1] - lse).nan_to_num(0.0)[..., None] for p in parts]
    return sum(wi * p[0] for wi, p in zip(w, parts, strict=True)), lse


def merge_no_rescale(parts):
    """Each part weighted by its local sum exp(lse_i - m_i), its own max never brought to the common one."""
    local = [torch.exp(p[1] - p[2]).nan_to_num(0.0)[..., None] for p in parts]
    total = sum(local)
    return sum(li * p[0] for li, p in zip(local, parts, strict=True)) / total.clamp_min(1e-30), merge_lse(parts)[1]


def merge_average(parts):
    return sum(p[0] for p in parts) / len(parts), sum(p[1] for p in parts) / len(parts)


def split(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
          sinks=None):  # fmt: skip
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, window, softcap, sinks,
                  attend=_split_with(merge_lse))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# paged bugs


def table_ignored(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    """A sequence's pages assumed contiguous, from its first block on."""
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  where=lambda tab, b, t, P, N: ((tab[b, 0].long() + t // P) % N, t % P))  # fmt: skip


def page_off_by_one(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  where=lambda tab, b, t, P, N: (tab[b, t // P + 1], t % P))  # fmt: skip


def slot_wraps_early(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    """The slot off by one at a page boundary: a page's last token read from its first slot."""
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                      where=lambda tab, b, t, P, N: (tab[b, t // P], torch.where(t % P == P - 1, 0, t % P)))


def boundary_next_page(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    """The page index of (t + 1): a page's last token read from the next page's block (same slot)."""
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                      where=lambda tab, b, t, P, N: (tab[b, (t + 1) // P], t % P))  # fmt: skip


def seqlens_plus_one(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  length=lambda n, lens: n + 1)  # fmt: skip


def seqlens_minus_one(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  length=lambda n, lens: n - 1)  # fmt: skip


def seqlens_ignored(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  length=lambda n, lens: max(lens))  # fmt: skip


def split_no_rescale(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  attend=_split_with(merge_no_rescale))  # fmt: skip


def split_average(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                  attend=_split_with(merge_average))  # fmt: skip


def query_at_zero(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    return paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None, top_left=True)


# ---------------------------------------------------------------------------------------------------------
# varlen


def _varlen(q, k, v, cu_q, cu_k, causal, scale, window, softcap, sinks, *, keys=None):
    B = len(cu_q) - 1
    outs, lses = [], []
    for b in range(B):
        lo, hi = (int(cu_k[b]), int(cu_k[b + 1])) if keys is None else keys(cu_k, b, k.shape[0])
        qb = q[int(cu_q[b]) : int(cu_q[b + 1])].transpose(0, 1)[None]  # (1, H, len_q, d)
        kb, vb = (t[lo:hi].transpose(0, 1)[None] for t in (k, v))  # (1, Hkv, len_k, d)
        o, lse, _ = dense(qb, kb, vb, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
        outs.append(o[0].transpose(0, 1))  # (len_q, H, d)
        lses.append(lse[0])  # (H, len_q)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, -1).float()


def varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None,
           window=None, softcap=0.0, sinks=None):  # fmt: skip
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap, sinks)


def varlen_neighbour(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None):
    """Each sequence's keys start where the previous sequence's start: it sees its neighbour."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, None, 0.0, None,
                   keys=lambda cu, b, total: (int(cu[max(b - 1, 0)]), int(cu[b + 1])))  # fmt: skip


def cu_seqlens_off_by_one(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                          scale=None):  # fmt: skip
    """Each sequence's keys end at cu_seqlens_k[b + 1] + 1: the next sequence's first key read too."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, None, 0.0, None,
                   keys=lambda cu, b, total: (int(cu[b]), min(int(cu[b + 1]) + 1, total)))  # fmt: skip
