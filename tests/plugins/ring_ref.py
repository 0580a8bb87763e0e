"""Ring-contract plug-ins written for the tests, apart from impl/ and the bug catalog: a plain all-gather kernel (the
right answer, both layouts, differentiable) and rank-level faults (a raise, an exit, a deadlock, a lie)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def _positions(S: int, W: int, layout: str, r: int) -> torch.Tensor:
    if layout == "contiguous":
        return torch.arange(r * S // W, (r + 1) * S // W)
    c = S // (2 * W)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * W - 1 - r) * c, (2 * W - r) * c)])


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of every rank's gradient for the whole tensor, this rank's
    tokens kept."""

    @staticmethod
    def forward(ctx, x, group, layout):
        W, r = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(W)]
        dist.all_gather(parts, x.contiguous(), group=group)
        S = x.shape[2] * W
        full = x.new_empty(*x.shape[:2], S, x.shape[3])
        for j, p in enumerate(parts):
            full[:, :, _positions(S, W, layout, j)] = p
        ctx.group, ctx.layout, ctx.mine = group, layout, _positions(S, W, layout, r)
        return full

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g[:, :, ctx.mine], None, None


def gather_attn(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    W, r = dist.get_world_size(group), dist.get_rank(group)
    S = q.shape[2] * W
    kk, vv = _Gather.apply(k, group, layout), _Gather.apply(v, group, layout)  # (B, Hkv, S, d)
    g = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)  # (B, H, S, d)
    s = (q.float() @ kk.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        qp = _positions(S, W, layout, r)
        s = s.masked_fill(torch.arange(S)[None, :] > qp[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vv.float()).to(q.dtype), lse


gather_attn.layouts = ("contiguous", "zigzag")


def out_only(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    return gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)[0]


def raises_on_rank_1(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    if dist.get_rank(group) == 1:
        raise ValueError("rank 1 cannot go on")
    return gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)


def exits_on_last_rank(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        os._exit(3)
    return gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)


def deadlocks(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Every rank receives from its left neighbour first and sends after: nobody ever sends."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    buf = torch.empty_like(k)
    dist.recv(buf, src=dist.get_global_rank(group, (r - 1) % W), group=group)
    dist.send(k.contiguous(), dst=dist.get_global_rank(group, (r + 1) % W), group=group)
    return gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)


def rank_0_hangs(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Rank 0 sleeps after its collective: the others return, it never does."""
    out = gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)
    if dist.get_rank(group) == 0:
        time.sleep(3600)
    return out


def half_lse(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Rank 0 returns (out, lse), the others out alone."""
    out, lse = gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout=layout)
    return (out, lse) if dist.get_rank(group) == 0 else out


def allgather_zigzag_blind(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Declares zigzag but always places the gathered keys contiguously (a mask from the wrong positions)."""
    return gather_attn(q, k, v, group=group, causal=causal, scale=scale, layout="contiguous")


allgather_zigzag_blind.layouts = ("zigzag",)


# -- mistakes written apart from the bug catalog (whose ring bugs are steps of a textbook ring): each on the plain
#    all-gather kernel, with the stage its verdict must name (tests/test_ring_contract.py)


def _plain(q, k, v, group, causal, scale, layout, keys=None, keep=None, split=False):
    W, r = dist.get_world_size(group), dist.get_rank(group)
    S = q.shape[2] * W
    with torch.no_grad():
        kk, vv = _Gather.apply(k, group, layout), _Gather.apply(v, group, layout)  # (B, Hkv, S, d)
    if keys is not None:
        kk, vv = keys(kk, S, W, layout), keys(vv, S, W, layout)
    g = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(g, 1).float(), vv.repeat_interleave(g, 1).float()  # (B, H, S, d)
    s = (q.float() @ kk.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    qp, kp = _positions(S, W, layout, r), torch.arange(S)
    ok = (kp[None, :] <= qp[:, None]) if causal else torch.ones(len(qp), S, dtype=torch.bool)
    if keep is not None:
        ok = keep(ok, qp, kp, S, W, layout, r, causal)
    s = s.masked_fill(~ok, float("-inf"))
    if split:  # each half of the keys softmaxed alone, the two outputs added
        h = S // 2
        parts = [torch.nan_to_num(torch.softmax(s[..., a:b], -1)) @ vv[:, :, a:b] for a, b in ((0, h), (h, S))]
        return (parts[0] + parts[1]).to(q.dtype)
    return (torch.softmax(s, -1) @ vv).to(q.dtype)


def future_ranks_seen(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Causal only inside the rank's own tokens: other ranks' later keys are seen."""

    def keep(ok, qp, kp, S, W, lay, r, causal):
        own = torch.zeros(S, dtype=torch.bool)
        own[_positions(S, W, lay, r)] = True
        return ok | ~own[None, :]

    return _plain(q, k, v, group, causal, scale, layout, keep=keep)


def own_keys_dropped(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """The rank's own keys never enter (a row that sees nothing else gives NaN: a fault of its own)."""

    def keep(ok, qp, kp, S, W, lay, r, causal):
        own = torch.zeros(S, dtype=torch.bool)
        own[_positions(S, W, lay, r)] = True
        return ok & ~own[None, :]

    return _plain(q, k, v, group, causal, scale, layout, keep=keep)


def blocks_rotated(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Rank j's keys and values placed where rank j + 1's belong (and masked by those positions)."""

    def keys(x, S, W, lay):
        out = torch.empty_like(x)
        for j in range(W):
            out[:, :, _positions(S, W, lay, j)] = x[:, :, _positions(S, W, lay, (j - 1) % W)]
        return out

    return _plain(q, k, v, group, causal, scale, layout, keys=keys)


def halves_summed(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    return _plain(q, k, v, group, causal, scale, layout, split=True)


def scale_ignored(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    return _plain(q, k, v, group, causal, None, layout)


def kv_heads_tiled(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Query head h reads KV head h % Hkv (repeat, not repeat_interleave)."""
    g = q.shape[1] // k.shape[1]
    return gather_attn(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), group=group, causal=causal, scale=scale,
                       layout=layout)  # fmt: skip


def outputs_rolled(q, k, v, *, group, causal=True, scale=None, layout="contiguous"):
    """Every rank computes every rank's output right, then returns its right neighbour's."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    qs = [torch.empty_like(q) for _ in range(W)]
    dist.all_gather(qs, q.contiguous(), group=group)
    out = None
    for j in range(W):
        # the others' queries as if they were this rank's: their positions are what the mask needs
        o = _plain_at(qs[j], k, v, group, causal, scale, layout, j)
        out = o if j == (r + 1) % W else out
    return out


def _plain_at(q, k, v, group, causal, scale, layout, owner):
    W = dist.get_world_size(group)
    S = q.shape[2] * W
    kk, vv = _Gather.apply(k, group, layout), _Gather.apply(v, group, layout)  # (B, Hkv, S, d)
    g = q.shape[1] // k.shape[1]
    kk, vv = kk.repeat_interleave(g, 1).float(), vv.repeat_interleave(g, 1).float()  # (B, H, S, d)
    s = (q.float() @ kk.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.arange(S)[None, :] > _positions(S, W, layout, owner)[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ vv).to(q.dtype)


for _f in (future_ranks_seen, own_keys_dropped, blocks_rotated, halves_summed, scale_ignored, kv_heads_tiled,
           outputs_rolled):  # fmt: skip
    _f.layouts = ("contiguous", "zigzag")
