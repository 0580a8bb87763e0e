"""Ring attention's steps written the ways people get them wrong (ring-flash-attention's, Megatron's and
torchtitan's issues): each a step of ring.py's textbook, and each bug a module-level --ring function with one step
swapped, importable by a rank process as `harness.bugs.ring_mistakes:NAME` (the catalog's ring entries)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from harness.bugs import ring
from harness.bugs.ring import LAYOUTS, make, plain, visible, wide

# ---- ring_merge: how partial (out, lse) results combine


def merge_running_unscaled(out, lse, out_s, lse_s):
    """The block's output weighed by exp(lse_s - lse_new), the running output added as it was, never rescaled to
    the new denominator."""
    new = torch.logaddexp(lse, lse_s)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    return out + out_s * torch.exp(lse_s - safe)[..., None], new


def merge_summed(out, lse, out_s, lse_s):
    """The blocks' normalised outputs summed (each as if it held the whole softmax); lse right."""
    return out + out_s, torch.logaddexp(lse, lse_s)


def merge_base2(out, lse, out_s, lse_s):
    """The new lse by logaddexp2 (FlashAttention's base-2 trick, on natural-log lse), the weights by natural exp."""
    new = torch.logaddexp2(lse, lse_s)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    return out * torch.exp(lse - safe)[..., None] + out_s * torch.exp(lse_s - safe)[..., None], new


def block_softmax_nan(q, k, v, keep, scale):
    """torch.softmax over the masked scores: a row that sees no key of the block (a later rank's, under causal)
    gives exp(-inf - -inf) = NaN, and NaN times its zero weight in the merge is still NaN."""
    s = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~keep, float("-inf"))  # (B, H, Sq, Sk)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


# ---- ring_mask: which keys of a block a query sees


def visible_as_diagonal(qpos, kpos, *, causal, own):
    """Every block masked like the diagonal one: query i sees key j <= i by index within the block, whichever rank
    the block came from (an earlier rank's block loses keys, a later one's shows some)."""
    if not causal:
        return torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    return torch.arange(len(kpos))[None, :] <= torch.arange(len(qpos))[:, None]


def visible_remote_whole(qpos, kpos, *, causal, own):
    """ring-flash-attention's contiguous masks (the diagonal causal, any other block whole) without its skip of the
    later ranks' blocks: those are seen whole too."""
    if own:
        return visible(qpos, kpos, causal=causal, own=own)
    return torch.ones(len(qpos), len(kpos), dtype=torch.bool)


def positions_first_chunk(r, W, n, layout):
    """zigzag: both halves of the shard numbered with the first chunk's positions (its second chunk, near the end of
    the sequence, masked as if it sat at the start)."""
    if layout != "zigzag":
        return ring.positions(r, W, n, layout)
    first = torch.arange(r * (n // 2), (r + 1) * (n // 2))
    return torch.cat([first, first])


# ---- ring_order: which block is where at which step


def take_remote_only(r, src):
    """The rank's own block skipped (the loop starts at the first received block)."""
    return src != r


def rounds_one_more(W):
    """range(W + 1): one exchange too many brings the rank's own block back round, and it is merged again."""
    return W + 1


def peers_reversed(r, W):
    """Send to r - 1, receive from r + 1: the block held at step s is rank r + s's, while source() (and so the
    masks) still say r - s. With W = 2 the two neighbours are the same rank."""
    return (r - 1) % W, (r + 1) % W


def grads_own_queries(q, k, v, dout, *, group, causal, scale, layout, positions):
    """dK/dV never sent back to their owners: each rank differentiates only its own queries' output, so its k/v
    shard's gradient holds its own queries' part; what the other ranks' queries owe it stays with them. dq right."""
    r, W, n = dist.get_rank(group), dist.get_world_size(group), q.shape[2]
    wd = wide(q)
    pos = torch.cat([positions(i, W, n, layout) for i in range(W)])  # [S], the gathered order's positions
    keep = visible(positions(r, W, n, layout), pos, causal=causal, own=True)  # (n, S): this rank's queries
    with torch.enable_grad():
        Q = q.detach().to(wd).requires_grad_()
        K, V = (ring.gather(t.detach(), group).to(wd).requires_grad_() for t in (k, v))  # (B, Hkv, S, d)
        plain(Q, K, V, keep, scale).backward(dout.to(wd))
    own = slice(r * n, (r + 1) * n)
    return Q.grad.to(q.dtype), K.grad[:, :, own].to(k.dtype), V.grad[:, :, own].to(v.dtype)


# ---- the bugs, as --ring functions


def bug(name: str, layouts: tuple = LAYOUTS, **changes) -> Callable:
    """The textbook with `changes` swapped in, named so that `harness.bugs.ring_mistakes:name` finds it (and pickle)."""
    fn = make(**changes)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.layouts = layouts
    return fn


ring_merge_unrescaled = bug("ring_merge_unrescaled", merge=merge_running_unscaled)
ring_merge_sum = bug("ring_merge_sum", merge=merge_summed)
ring_lse_base2 = bug("ring_lse_base2", merge=merge_base2)
ring_empty_block_nan = bug("ring_empty_block_nan", block=block_softmax_nan)
ring_remote_diagonal_mask = bug("ring_remote_diagonal_mask", visible=visible_as_diagonal)
ring_future_blocks_seen = bug("ring_future_blocks_seen", visible=visible_remote_whole)
ring_zigzag_first_chunk = bug("ring_zigzag_first_chunk", ("zigzag",), positions=positions_first_chunk)
ring_own_block_skipped = bug("ring_own_block_skipped", take=take_remote_only)
ring_own_block_twice = bug("ring_own_block_twice", rounds=rounds_one_more)
ring_wrong_neighbour = bug("ring_wrong_neighbour", peers=peers_reversed)
ring_dkv_not_returned = bug("ring_dkv_not_returned", grads=grads_own_queries)

BUGS = (ring_merge_unrescaled, ring_merge_sum, ring_lse_base2, ring_empty_block_nan, ring_remote_diagonal_mask,
        ring_future_blocks_seen, ring_zigzag_first_chunk, ring_own_block_skipped, ring_own_block_twice,
        ring_wrong_neighbour, ring_dkv_not_returned)  # fmt: skip
