"""Ring attention (context parallelism, the --ring contract of issue 28) as a textbook whose every step can be
swapped, computed the plainest way, so a bug is one step written wrong (ring_mistakes.py, the catalog's ring bugs).

    shards    rank r of W holds q, k, v for S / W tokens at global positions `positions`: contiguous (r*n .. r*n+n-1)
              or zigzag (the sequence in 2W chunks; rank r holds chunk r, then chunk 2W-1-r)
    forward   for s = 0 .. W-1 the rank holds the K/V block of rank source(r, s) = r - s: its own at s = 0, each later
              one received from r - 1 while it sends the one it held to r + 1 (W - 1 exchanges of K + V);
              each query sees the block's keys at global positions <= its own (causal); the block's partial
              (out_s, lse_s) is a plain masked softmax (GQA: KV heads repeated locally); the running (out, lse)
              takes it in by log-sum-exp
    backward  the plainest right gradient, no ring at all: every rank's q, k, v and dout gathered, the whole
              sequence's attention differentiated with autograd, this rank's slices kept (each rank does all the
              work: a reference, not a kernel)

Every step runs in float32 at least (float64 stays), so the same code in float64 is an exact reference. Every
communication goes through `dist.x` looked up at call time (the harness counts the bytes with wrappers on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from impl.gqa import groups, repeat_kv

LAYOUTS = ("contiguous", "zigzag")


def wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def positions(r: int, W: int, n: int, layout: str) -> torch.Tensor:
    """[n]: the global positions of rank r's n tokens."""
    if layout == "contiguous":
        return torch.arange(r * n, (r + 1) * n)
    if layout == "zigzag":
        c = n // 2  # the sequence is 2W chunks of c tokens; rank r holds chunks r and 2W-1-r
        return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * W - 1 - r) * c, (2 * W - r) * c)])
    raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")


def source(r: int, s: int, W: int) -> int:
    """The rank whose K/V block rank r holds at step s: after s passes along the ring, r - s's."""
    return (r - s) % W


def peers(r: int, W: int) -> tuple[int, int]:
    """(send to, receive from), as ranks in the group: the block moves one rank up the ring each step."""
    return (r + 1) % W, (r - 1) % W


def rounds(W: int) -> int:
    """How many blocks the loop visits: the rank's own, then one more after each of the W - 1 exchanges."""
    return W


def take(r: int, src: int) -> bool:
    """Whether the block held is merged: every one (a block no query sees comes back empty, lse -inf)."""
    return True


def visible(qpos: torch.Tensor, kpos: torch.Tensor, *, causal: bool, own: bool) -> torch.Tensor:
    """(Sq, Sk) bool: query at global position p sees key at j iff j <= p (causal), whichever rank the block is
    from (own: it is the rank's own, the diagonal block)."""
    if not causal:
        return torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    return kpos[None, :] <= qpos[:, None]


def block(q, k, v, keep, scale):
    """One block: q (B, H, Sq, d), k/v (B, H, Sk, d) in a wide dtype, keep (Sq, Sk) -> out_s (B, H, Sq, d) normalised
    over this block's keys, lse_s (B, H, Sq) natural log of its softmax's denominator; a row that sees no key of the
    block gives out_s 0, lse_s -inf (it weighs nothing in the merge)."""
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H, Sq), -inf for a row with no key
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])  # 0 where masked
    return p @ v, lse


def merge(out, lse, out_s, lse_s):
    """The running (out, lse) and a block's (out_s, lse_s) -> their union's: each output weighed by its share of the
    whole denominator, exp(lse_i - lse_new), lse_new = log(exp(lse) + exp(lse_s)); -inf only if both are."""
    new = torch.logaddexp(lse, lse_s)  # (B, H, Sq)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    return out * torch.exp(lse - safe)[..., None] + out_s * torch.exp(lse_s - safe)[..., None], new


def gather(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's shard of t concatenated along the sequence, in rank order: (B, h, S/W, d) -> (B, h, S, d)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, 2)  # (B, h, S, d)


def plain(q, k, v, keep, scale):
    """Plain attention with autograd: q (B, H, Sq, d), k/v (B, Hkv, Sk, d), keep (Sq, Sk) -> (B, H, Sq, d)."""
    g = q.shape[1] // k.shape[1]
    s = (q @ repeat_kv(k, g).transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ repeat_kv(v, g)  # every query sees itself


def grads(q, k, v, dout, *, group, causal, scale, layout, positions):
    """-> this rank's dq, dk, dv: the whole sequence's gradient of sum over ranks of sum(out_r * dout_r), every
    rank's queries contributing to every shard's dk, dv (all gathered; W times the work, on purpose)."""
    r, W, n = dist.get_rank(group), dist.get_world_size(group), q.shape[2]
    wd = wide(q)
    pos = torch.cat([positions(i, W, n, layout) for i in range(W)])  # [S], the gathered order's positions
    keep = visible(pos, pos, causal=causal, own=True)
    with torch.enable_grad():
        Q, K, V = (gather(t.detach(), group).to(wd).requires_grad_() for t in (q, k, v))  # (B, h, S, d)
        out = plain(Q, K, V, keep, scale)
        out.backward(gather(dout, group).to(wd))
    own = slice(r * n, (r + 1) * n)
    return Q.grad[:, :, own].to(q.dtype), K.grad[:, :, own].to(k.dtype), V.grad[:, :, own].to(v.dtype)


@dataclass(frozen=True)
class Steps:
    positions: Callable = positions  # (r, W, n, layout) -> the global positions of rank r's tokens
    source: Callable = source  # (r, s, W) -> whose block rank r holds at step s
    peers: Callable = peers  # (r, W) -> (send to, receive from)
    rounds: Callable = rounds  # W -> blocks visited (own first)
    take: Callable = take  # (r, source) -> merge this block or not
    visible: Callable = visible  # (qpos, kpos, causal=, own=) -> (Sq, Sk) bool
    block: Callable = block  # (q, k, v, keep, scale) -> out_s, lse_s
    merge: Callable = merge  # (out, lse, out_s, lse_s) -> out, lse
    grads: Callable = grads  # (q, k, v, dout, group=, causal=, scale=, layout=, positions=) -> dq, dk, dv


def exchange(kv: torch.Tensor, group, to: int, frm: int) -> torch.Tensor:
    """Send the block held to group rank `to`, receive the next from `frm` (p2p takes global ranks)."""
    got = torch.empty_like(kv)
    reqs = [dist.isend(kv, dist.get_global_rank(group, to), group=group),
            dist.irecv(got, dist.get_global_rank(group, frm), group=group)]  # fmt: skip
    for req in reqs:
        req.wait()
    return got


def forward(steps: Steps, q, k, v, group, causal: bool, scale: float, layout: str):
    """This rank's (out, lse) in a wide dtype: (B, H, n, d), (B, H, n)."""
    r, W = dist.get_rank(group), dist.get_world_size(group)
    B, H, n, d = q.shape
    g, wd = groups(H, k.shape[1]), wide(q)
    qpos = steps.positions(r, W, n, layout)
    qw = q.to(wd)
    out = torch.zeros(B, H, n, d, dtype=wd)
    lse = torch.full((B, H, n), float("-inf"), dtype=wd)
    kv = torch.stack([k, v]).contiguous()  # (2, B, Hkv, n, d): K and V travel as one message, in their dtype
    to, frm = steps.peers(r, W)
    for s in range(steps.rounds(W)):
        if s:
            kv = exchange(kv, group, to, frm)
        src = steps.source(r, s, W)
        if not steps.take(r, src):
            continue
        keep = steps.visible(qpos, steps.positions(src, W, n, layout), causal=causal, own=src == r)  # (n, n)
        kb, vb = repeat_kv(kv[0].to(wd), g), repeat_kv(kv[1].to(wd), g)  # (B, H, n, d)
        out_s, lse_s = steps.block(qw, kb, vb, keep, scale)
        out, lse = steps.merge(out, lse, out_s, lse_s)
    return out, lse


class Ring(torch.autograd.Function):
    """The forward on the ring; the backward by steps.grads. lse is an output without a gradient."""

    @staticmethod
    def forward(ctx, q, k, v, steps, group, causal, scale, layout):
        out, lse = forward(steps, q.detach(), k.detach(), v.detach(), group, causal, scale, layout)
        ctx.save_for_backward(q, k, v)
        ctx.steps, ctx.group, ctx.causal, ctx.scale, ctx.layout = steps, group, causal, scale, layout
        lse = lse.float()
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = ctx.steps.grads(q, k, v, dout, group=ctx.group, causal=ctx.causal, scale=ctx.scale,
                                     layout=ctx.layout, positions=ctx.steps.positions)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def make(steps: Steps | None = None, **changes) -> Callable:
    """A --ring contract function computed with `steps` and `changes` swapped in. Its __name__ is "attn": a bug made
    from it for a rank process to import by `module:NAME` must be renamed (ring_mistakes.bug)."""
    steps = replace(steps or Steps(), **changes)

    def attn(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return Ring.apply(q, k, v, steps, group, causal, scale, layout)

    attn.layouts = LAYOUTS
    return attn


textbook = make()
textbook.__name__ = textbook.__qualname__ = "textbook"  # importable as harness.bugs.ring:textbook
