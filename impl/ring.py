"""The ring contract's built-ins (impl/__init__.py's RING): attention over a sequence sharded across the ranks of a
torch.distributed group, each rank holding S / W tokens of q, k and v (impl/ring_layout.py: which tokens).

    ring          ring attention (impl/ring_forward.py, impl/ring_backward.py): K/V blocks travel around the ring,
                  overlapped with the compute, merged by log-sum-exp; the contiguous layout
    ring_zigzag   the same algorithm on the zigzag layout: under a causal mask every rank does the same work
    allgather     the simplest correct baseline: every rank gathers the whole K and V (all_gather), attends its own
                  queries to them locally, and in the backward sums every rank's dK, dV (all_reduce) and keeps its
                  own slice. It moves W times the ring's bytes and holds the whole K/V: a reference, not a kernel.

All three are autograd-aware: the harness's backward (sum(out * g) on every rank) gives each rank dq for its queries
and dk, dv for its shard with every rank's queries' shares in them. Communication goes through torch.distributed's
module attributes (dist.isend, dist.all_gather, ...) looked up at call time, so wrappers installed on the module see it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from impl import ring_layout, tiled
from impl.ring_backward import RingAttention
from impl.ring_forward import check_shapes, ring_forward


def declared(fn, layout: str) -> None:
    if layout not in fn.layouts:
        raise ValueError(f"{fn.__name__} runs the layouts {fn.layouts}, not {layout!r}")


def wants_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def run_ring(q, k, v, opts: dict):
    """The autograd Function only when a gradient is wanted; otherwise the forward itself, nothing saved."""
    return RingAttention.apply(q, k, v, opts) if wants_grad(q, k, v) else ring_forward(q, k, v, **opts)


def ring(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """This rank's q (B, H, S/W, d), k, v (B, Hkv, S/W, d) -> (out (B, H, S/W, d) in q's dtype, lse (B, H, S/W)
    float32, float64 for float64 inputs). Ring attention on the contiguous layout."""
    declared(ring, layout)
    return run_ring(q, k, v, dict(group=group, causal=causal, scale=scale, layout=layout))


def ring_zigzag(q, k, v, *, group, causal=True, scale=None, layout="zigzag"):
    """As `ring`, on the zigzag layout (rank r holds chunks r and 2W - 1 - r of 2W)."""
    declared(ring_zigzag, layout)
    return run_ring(q, k, v, dict(group=group, causal=causal, scale=scale, layout=layout))


ring.layouts = ("contiguous",)
ring_zigzag.layouts = ("zigzag",)


def gather(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """Every rank's shard (B, Hkv, S/W, d) -> the whole (B, Hkv, S, d), in sequence order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return ring_layout.unshard(parts, layout)


class GatherKV(torch.autograd.Function):
    """(K, V) whole = gather of every rank's (k, v) shards. Backward: each rank's dK covers every key (its queries'
    shares), so the whole gradient of this rank's shard is the sum over ranks (all_reduce) of its slice."""

    @staticmethod
    def forward(ctx, k, v, group, layout):
        ctx.group, ctx.layout = group, layout
        return gather(k.contiguous(), group, layout), gather(v.contiguous(), group, layout)

    @staticmethod
    def backward(ctx, dK, dV):
        W, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grads = []
        for g in (dK, dV):
            g = g.contiguous().clone()  # (B, Hkv, S, d); all_reduce writes in place
            dist.all_reduce(g, group=ctx.group)
            grads.append(ring_layout.shard(g, r, W, ctx.layout))  # (B, Hkv, S/W, d)
        return grads[0], grads[1], None, None


def allgather(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """As `ring`, by gathering the whole K and V on every rank. Each run of consecutive global positions the rank
    holds (one for contiguous, two for zigzag) attends causally to the keys up to its last position: the tiled core
    aligns queries bottom-right, so query i of a run [a, b) sits at b - (b - a) + i = a + i, its global position."""
    declared(allgather, layout)
    check_shapes(q, k, v)
    W, r = dist.get_world_size(group), dist.get_rank(group)
    n = q.shape[2]
    ring_layout.check(layout, W, W * n)
    if wants_grad(k, v):
        K, V = GatherKV.apply(k, v, group, layout)  # (B, Hkv, S, d) each
    else:
        K, V = gather(k.contiguous(), group, layout), gather(v.contiguous(), group, layout)
    if not causal:
        return tiled.core(q, K, V, causal=False, scale=scale)
    outs, lses, i = [], [], 0
    for a, b in ring_layout.chunks(r, W, W * n, layout):
        o, l = tiled.core(q[:, :, i:i + b - a], K[:, :, :b], V[:, :, :b], causal=True, scale=scale)
        outs.append(o)
        lses.append(l)
        i += b - a
    return torch.cat(outs, 2), torch.cat(lses, 2)  # (B, H, S/W, d), (B, H, S/W)


allgather.layouts = ("contiguous", "zigzag")
