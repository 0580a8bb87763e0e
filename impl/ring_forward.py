"""Ring attention's forward (context parallelism): W ranks each hold S / W tokens of q, k and v, and the K/V blocks
travel around the ring while the queries stay put. No rank ever holds more than two K/V blocks.

The ring. Rank r sends to rank r + 1 and receives from rank r - 1 (mod W). At step s = 0 .. W - 1 rank r holds the
K/V block that rank (r - s) mod W started with: at step 0 its own, then its left neighbour's, and so on, until at
step W - 1 it has met every block once. Each step:

    1. post isend(current block -> r + 1) and irecv(next block <- r - 1)   (not at the last step: nothing left to meet)
    2. attend the rank's queries to the current block: a partial result (out_s, lse_s)
    3. wait for the transfer; the received block is the next step's

Posting the transfer before the compute overlaps communication with computation: while step 2 runs, the next block
is already on its way. Each rank sends W - 1 blocks of K and V, (W - 1) x (K shard + V shard) bytes, the least any
scheme can send when every rank must see every block. GQA: the block travels with its Hkv heads, never expanded.

The merge. Each partial is a softmax over one block's keys: out_s = sum_t exp(s_t - lse_s) v_t, lse_s = log sum_t
exp(s_t) over the block's visible keys t. The softmax over all keys is their weighted combination:

    lse = log sum_s exp(lse_s)                      (the whole denominator is the sum of the blocks' denominators)
    out = sum_s exp(lse_s - lse) out_s              (each block's share of that denominator rescales its output)

done here one block at a time, as a running pair (out, lse): with lse' = logaddexp(lse, lse_s),
out' = exp(lse - lse') out + exp(lse_s - lse') out_s. Each weight is <= 1, so nothing overflows. A row that has seen
no key yet has lse = -inf and out = 0; two such rows merge to -inf and 0 (never exp(-inf - -inf) = NaN). The running
pair is kept in float32 (float64 for float64 inputs), whatever the inputs' dtype.

Which keys of a block a query sees (the causal mask from global positions, the zigzag halves) is impl/ring_layout.py's
block_plan; each rectangle it names is one call of the tiled core (impl/tiled_forward.py's flash_forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from impl import ring_layout
from impl.gqa import groups
from impl.tiled_forward import flash_forward
from impl.tiles import accumulator_dtype

KV_TAG = 0  # K and V travel with tags 0, 1; their gradients (impl/ring_backward.py) with DKV_TAG, DKV_TAG + 1
DKV_TAG = 2


class Ring:
    """This rank's place in the group's ring: its rank r and the world W (group ranks), and the global ranks of its
    neighbours r + 1 (it sends there) and r - 1 (it receives from there), as torch.distributed's p2p calls want."""

    def __init__(self, group):
        self.group = group
        self.W, self.r = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.r + 1) % self.W)
        self.prev = dist.get_global_rank(group, (self.r - 1) % self.W)

    def source(self, step: int) -> int:
        """The group rank whose block this rank holds at this step."""
        return (self.r - step) % self.W

    def pass_on(self, tensors: list[torch.Tensor], tag: int) -> tuple[list[torch.Tensor], list]:
        """Post isend of each tensor to r + 1 and irecv of one like it from r - 1 (tags tag, tag + 1, ...: several
        transfers between the same pair may be in flight at once). Returns the receive buffers, valid once every
        returned work is waited on (`wait`). The tensors must not be written to until then."""
        got, works = [], []
        for i, t in enumerate(tensors):
            buf = torch.empty_like(t)
            works.append(dist.isend(t, dst=self.next, group=self.group, tag=tag + i))
            works.append(dist.irecv(buf, src=self.prev, group=self.group, tag=tag + i))
            got.append(buf)
        return got, works


def wait(works: list) -> None:
    for w in works:
        w.wait()


def merge(out: torch.Tensor, lse: torch.Tensor, out_s: torch.Tensor, lse_s: torch.Tensor) -> None:
    """Folds one block's partial (out_s (B, H, n, d), lse_s (B, H, n)) into the running (out, lse), in place."""
    new = torch.logaddexp(lse, lse_s)  # (B, H, n)
    shift = torch.where(torch.isfinite(new), new, 0.0)  # rows that have seen no key: both weights exp(-inf) = 0
    old_w = torch.exp(lse - shift).unsqueeze(-1)  # (B, H, n, 1)
    new_w = torch.exp(lse_s - shift).unsqueeze(-1)  # (B, H, n, 1)
    out.mul_(old_w).add_(out_s.to(out.dtype) * new_w)
    lse.copy_(new)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, n, d), k and v (B, Hkv, n, d): one shard each of the same tokens."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"ring attention wants q (B, H, n, d), k, v (B, Hkv, n, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} are not shards of the same tokens")
    groups(q.shape[1], k.shape[1])


def ring_forward(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """This rank's shard q (B, H, n, d), k, v (B, Hkv, n, d) -> (out (B, H, n, d) in q's dtype, lse (B, H, n)),
    attention of its queries over the whole sequence. lse: float32 natural log (float64 for float64 inputs, as the
    tiled core). Every rank of the group must call it with its own shard."""
    check_shapes(q, k, v)
    ring = Ring(group)
    B, H, n, d = q.shape
    ring_layout.check(layout, ring.W, ring.W * n)
    wide = accumulator_dtype(q.dtype)
    out = torch.zeros(B, H, n, d, dtype=wide, device=q.device)  # the running (out, lse) of the merge
    lse = torch.full((B, H, n), float("-inf"), dtype=wide, device=q.device)
    kv = [k.contiguous(), v.contiguous()]  # the block held now; p2p sends whole buffers

    for step in range(ring.W):
        last = step == ring.W - 1
        if not last:  # 1. the next block is on its way while this one is used
            following, works = ring.pass_on(kv, KV_TAG)
        for rows, cols, diag in ring_layout.block_plan(ring.r, ring.source(step), ring.W, n, causal, layout):
            out_s, lse_s = flash_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal=diag,
                                         scale=scale)  # 2. (B, H, rows, d), (B, H, rows)  # fmt: skip
            merge(out[:, :, rows], lse[:, :, rows], out_s, lse_s)  # views: merged in place
        if not last:  # 3.
            wait(works)
            kv = following

    return out.to(q.dtype), lse
