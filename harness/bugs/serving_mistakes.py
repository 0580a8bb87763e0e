"""The serving path's steps written the ways engines get them wrong (vLLM, FlashInfer and flash-decoding issues):
each a step of serving.py's textbook, swapped in by the catalog's paged and varlen bugs."""

from __future__ import annotations

import torch

from harness.bugs.serving import merge


def locate_contiguous(table_row, t, page_size):
    """The block table ignored: pages assumed contiguous from block 0."""
    return (t // page_size).long(), t % page_size


def locate_page_before(table_row, t, page_size):
    """The page index off by one: table[t // page_size - 1] (the first page reads the table's last column)."""
    return table_row[t // page_size - 1].long(), t % page_size


def locate_slot_boundary(table_row, t, page_size):
    """Off by one at a page boundary: the page of t + 1, the slot of t (a page's last slot read from the next)."""
    page = torch.clamp((t + 1) // page_size, max=table_row.shape[0] - 1)
    return table_row[page].long(), t % page_size


def length_plus_one(cache_seqlens, b):
    """cache_seqlens read as the index of the last token: one slot past the sequence (a NaN slot)."""
    return int(cache_seqlens[b]) + 1


def length_minus_one(cache_seqlens, b):
    """cache_seqlens taken as the length before the new tokens were appended: the last key missed."""
    return int(cache_seqlens[b]) - 1


def length_longest(cache_seqlens, b):
    """cache_seqlens ignored: every sequence read to the longest one's length."""
    return int(cache_seqlens.max())


def query_at_zero(L, Sq):
    """The new tokens placed at positions 0 .. Sq - 1 instead of the sequence's end."""
    return torch.arange(Sq)


def merge_unrescaled(parts, sinks):
    """Partial sums added without rescaling to a common max: sum_i acc_i / sum_i l_i, each in its own frame."""
    acc = sum(p[0] for p in parts)
    l = sum(p[1] for p in parts)  # noqa: E741
    if sinks is not None:
        m = parts[0][2]
        l = l + torch.exp(sinks.to(l.dtype).view(-1, 1, 1) - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    _, lse = merge(parts, sinks)
    return out, lse


def merge_average(parts, sinks):
    """The parts' normalised outputs averaged (each part weighed the same, whatever its share of the softmax)."""
    outs = [p[0] / torch.where(p[1] > 0, p[1], torch.ones_like(p[1])) for p in parts if bool((p[1] > 0).any())]
    _, lse = merge(parts, sinks)
    return sum(outs) / max(len(outs), 1), lse


def merge_lse_max(parts, sinks):
    """out right, lse the largest part's lse: log(sum_i exp(lse_i)) replaced by max_i lse_i."""
    out, _ = merge(parts, sinks)
    lses = torch.stack([(p[2] + torch.log(p[1])).squeeze(-1) for p in parts])  # (P, H, Sq)
    return out, lses.amax(0)


def bounds_with_neighbour(cu, b):
    """A sequence's keys start at the previous sequence's start: it sees its neighbour."""
    return int(cu[max(b - 1, 0)]), int(cu[b + 1])


def bounds_short(cu, b):
    """cu_seqlens read off by one: each sequence's last row dropped."""
    return int(cu[b]), int(cu[b + 1]) - 1
