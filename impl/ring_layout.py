"""How a sequence is laid out over the W ranks of a ring, as data: which global tokens each rank holds, and which
query rows of a rank see which keys of another rank's block. Pure tensor code, no torch.distributed.

Two layouts, both cutting the sequence of S tokens into equal chunks:

    contiguous   W chunks of n = S / W tokens; rank r holds chunk r, tokens [r n, (r + 1) n).
    zigzag       2W chunks of c = S / (2W) tokens; rank r holds chunk r then chunk 2W - 1 - r, concatenated
                 (ring-flash-attention's zigzag). With W = 4: rank 0 holds chunks 0 and 7, rank 3 chunks 3 and 4.

Why zigzag: under a causal mask the contiguous layout is unbalanced. Rank 0's queries see only their own block,
rank W - 1's see all W blocks, so the last rank works W times as long as the first while the others wait for it.
Pairing an early chunk with a late one gives every rank the same number of visible (query, key) pairs.

The block plan. In ring attention rank r meets every rank j's K/V block once; `block_plan` says which of r's query
rows attend to which keys of j's block, and whether that rectangle needs the causal diagonal. Query at global
position p sees key at global position t iff t <= p (causal). Because both layouts keep each rank's tokens in
increasing global order, a rank's own block under causal is plain local causal attention (the diagonal). Between
ranks, every chunk of one rank is either wholly before or wholly after every chunk of another, so each rectangle is
either fully visible or invisible:

    contiguous, j < r   all of j's block is before all of r's queries: everything visible, no mask
    contiguous, j > r   all of it is after: nothing visible, the block is skipped
    zigzag, j < r       j's first chunk (chunk j < r) is before both of r's chunks: all queries see it; its second
                        chunk (2W - 1 - j > 2W - 1 - r) is after both: no query sees it
    zigzag, j > r       j's both chunks (j and 2W - 1 - j, each > r and < 2W - 1 - r) are after r's first chunk and
                        before its second: only r's second-chunk queries see them, all of them

Every zigzag rectangle is half a block by a whole one: the same work for every j != r, which is the balance.
Non-causal attention sees every block whole. `visible` builds the same thing as a dense boolean from `positions`,
so the plan can be checked against the definition (tests/test_ring_impl.py does).
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check(layout: str, world: int, S: int) -> None:
    """A clear error for an unknown layout or a length the layout cannot cut into equal chunks."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}: expected one of {LAYOUTS}")
    parts = world if layout == "contiguous" else 2 * world
    if S % parts:
        raise ValueError(f"layout {layout!r} over {world} ranks needs a length divisible by {parts}, got {S}")


def chunks(rank: int, world: int, S: int, layout: str) -> list[tuple[int, int]]:
    """The global token ranges [start, stop) that `rank` holds, in the order it holds them."""
    check(layout, world, S)
    if layout == "contiguous":
        n = S // world
        return [(rank * n, (rank + 1) * n)]
    c = S // (2 * world)
    first, second = rank, 2 * world - 1 - rank
    return [(first * c, (first + 1) * c), (second * c, (second + 1) * c)]


def positions(rank: int, world: int, S: int, layout: str) -> torch.Tensor:
    """int64 [S / W]: the global position of each of the rank's tokens."""
    return torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in chunks(rank, world, S, layout)])


def shard(x: torch.Tensor, rank: int, world: int, layout: str, dim: int = 2) -> torch.Tensor:
    """The whole tensor (its sequence along dim) -> the rank's slice: (B, H, S, d) -> (B, H, S / W, d) for dim=2."""
    S = x.shape[dim]
    return torch.cat([x.narrow(dim, a, b - a) for a, b in chunks(rank, world, S, layout)], dim)


def unshard(shards: list[torch.Tensor], layout: str, dim: int = 2) -> torch.Tensor:
    """Every rank's slice, rank order -> the whole tensor: W x (B, H, S / W, d) -> (B, H, S, d) for dim=2."""
    W = len(shards)
    if layout == "contiguous":
        return torch.cat(shards, dim)
    check(layout, W, W * shards[0].shape[dim])
    c = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, c) for s in shards]  # chunk r, r = 0 .. W - 1
    seconds = [s.narrow(dim, c, c) for s in reversed(shards)]  # chunk 2W - 1 - r, i.e. chunks W .. 2W - 1 in order
    return torch.cat(firsts + seconds, dim)


def block_plan(rank: int, source: int, world: int, n: int, causal: bool,
               layout: str) -> list[tuple[slice, slice, bool]]:  # fmt: skip
    """Rank `rank`'s queries against the K/V block that rank `source` holds, n tokens each: a list of rectangles
    (query rows, key columns, causal) to attend, local indices; an empty list when nothing is visible. See the
    module's docstring for why each case is what it is."""
    check(layout, world, world * n)
    whole = slice(0, n)
    if not causal:
        return [(whole, whole, False)]
    if source == rank:
        return [(whole, whole, True)]  # local order is global order: the diagonal
    if layout == "contiguous":
        return [(whole, whole, False)] if source < rank else []
    h = n // 2
    if source < rank:
        return [(whole, slice(0, h), False)]  # all queries vs the source's first chunk
    return [(slice(h, n), whole, False)]  # the second-chunk queries vs the whole block


def visible(rank: int, source: int, world: int, n: int, causal: bool, layout: str) -> torch.Tensor:
    """(n, n) bool: query row i of `rank` sees key column t of `source`'s block, straight from the global positions
    (the definition block_plan is checked against)."""
    S = world * n
    p = positions(rank, world, S, layout)[:, None]  # (n, 1)
    t = positions(source, world, S, layout)[None, :]  # (1, n)
    return t <= p if causal else torch.ones(n, n, dtype=torch.bool)


def planned(rank: int, source: int, world: int, n: int, causal: bool, layout: str) -> torch.Tensor:
    """(n, n) bool: what block_plan attends, a causal rectangle as its lower triangle (bottom-right aligned, as the
    tiled core aligns it)."""
    keep = torch.zeros(n, n, dtype=torch.bool)
    for rows, cols, diag in block_plan(rank, source, world, n, causal, layout):
        sq, sk = rows.stop - rows.start, cols.stop - cols.start
        block = torch.ones(sq, sk, dtype=torch.bool)
        keep[rows, cols] = block.tril(sk - sq) if diag else block
    return keep
