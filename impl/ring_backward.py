"""Ring attention's backward: the same ring as the forward (impl/ring_forward.py), with each K/V block's gradient
travelling along with it.

Why per-block backward is exact. The forward's merged lse is the log of the whole softmax denominator, so for a key
t of any block the global probability is P_it = exp(s_it - lse_i), computed from that block alone. The tiled backward
(impl/tiled_backward.py's flash_backward, FlashAttention-2's Algorithm 2) needs nothing else: given the global out,
lse and dout it recomputes P for one block and returns that block's share of the gradients,

    dV_t += sum_i P_it dO_i,     dS_it = P_it (dO_i . v_t - D_i),   D_i = dO_i . O_i  (the global output),
    dQ_i += scale sum_t dS_it k_t,     dK_t += scale sum_i dS_it q_i,

and the blocks' shares simply add up: dQ over the blocks a rank meets, dK_t / dV_t over the ranks whose queries see
key t. (A gradient of lse adds dlse_i P_it to dS_it: D_i - dlse_i in place of D_i, again per block.)

The ring. dQ stays home: rank r's queries meet every block, so dQ_r is summed locally. dK and dV belong to the block,
whose gradient collects a share at every rank it visits, so they travel with it. At step s rank r holds block
(r - s) mod W and that block's gradient accumulator, which arrived from rank r - 1 with the share of every rank it
visited so far:

    1. post isend/irecv of the next K/V block (as in the forward; not at the last step)
    2. this block's shares: dQ_r += dQ, and a fresh (dK, dV) for the block
    3. wait for the block's accumulator from r - 1 (not at step 0: the block was home), add the fresh shares to it
    4. post isend of the accumulator to r + 1 and irecv of the next one from r - 1
    5. wait for the K/V transfer

After step W - 1 the accumulator rank r holds belongs to block (r + 1) mod W, the block it sent first: step 4 of the
last step is the hop home, and what rank r receives then is its own block's whole gradient. Step 4's transfer of one
step runs during the compute of the next. Per rank: W - 1 K/V blocks and W dK/dV accumulators sent (the
accumulators in float32, or float64 for float64 inputs: partial sums are not rounded to a half dtype on the way).

`RingAttention` is the autograd Function: forward ring_forward, saving q, k, v, out, lse (O(S / W) each).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from impl import ring_layout
from impl.ring_forward import DKV_TAG, KV_TAG, Ring, check_shapes, ring_forward, wait
from impl.tiled_backward import flash_backward
from impl.tiles import accumulator_dtype, forward_heads


def ring_backward(q, k, v, out, lse, dout, dlse, *, group, causal=True, scale=None, layout="contiguous",
                  needs=(True, True, True)):  # fmt: skip
    """This rank's (dq, dk, dv) for its shard, from the forward's out and lse (global: over the whole sequence) and
    the incoming dout (B, H, n, d), dlse (B, H, n) or None. needs: which of dq, dk, dv are wanted (None for the
    others); dk and dv are worked out together (they travel together). Every rank of the group must call it."""
    check_shapes(q, k, v)
    ring = Ring(group)
    B, H, n, d = q.shape
    need_q, need_kv = needs[0], needs[1] or needs[2]
    wide = accumulator_dtype(q.dtype)
    heads = forward_heads(B * k.shape[1], H // k.shape[1], None, None, q.dtype)  # S recomputed in the forward's GEMMs
    dq = torch.zeros(B, H, n, d, dtype=wide, device=q.device)  # (B, H, n, d): stays home
    kv = [k.contiguous(), v.contiguous()]  # the block held now
    acc, acc_works = None, []  # the gradient accumulator of the block held now, and its transfer

    for step in range(ring.W):
        last = step == ring.W - 1
        if not last:  # 1.
            following, kv_works = ring.pass_on(kv, KV_TAG)
        dk_s = torch.zeros(kv[0].shape, dtype=wide, device=q.device)  # (B, Hkv, n, d): this rank's share
        dv_s = torch.zeros(kv[1].shape, dtype=wide, device=q.device)
        for rows, cols, diag in ring_layout.block_plan(ring.r, ring.source(step), ring.W, n, causal, layout):  # 2.
            gq, gk, gv, _ = flash_backward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                                           lse[:, :, rows], dout[:, :, rows],
                                           None if dlse is None else dlse[:, :, rows], causal=diag, scale=scale,
                                           needs=(need_q, need_kv, need_kv), score_heads=heads)  # fmt: skip
            if need_q:
                dq[:, :, rows] += gq  # (B, H, rows, d)
            if need_kv:
                dk_s[:, :, cols] += gk  # (B, Hkv, cols, d)
                dv_s[:, :, cols] += gv
        if need_kv:
            if step > 0:  # 3.
                wait(acc_works)
                dk_s += acc[0]
                dv_s += acc[1]
            acc, acc_works = ring.pass_on([dk_s, dv_s], DKV_TAG)  # 4. the last step's is the hop home
        if not last:  # 5.
            wait(kv_works)
            kv = following

    wait(acc_works)
    dq = dq.to(q.dtype) if need_q else None
    dk = acc[0].to(k.dtype) if needs[1] else None  # (B, Hkv, n, d): this rank's block, every rank's share in it
    dv = acc[1].to(v.dtype) if needs[2] else None
    return dq, dk, dv


class RingAttention(torch.autograd.Function):
    """(out, lse) = ring_forward(q, k, v, **opts), differentiable in q, k and v through ring_backward (and in lse:
    its gradient enters as in the tiled backward). opts: group, causal, scale, layout. Once differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, opts):
        out, lse = ring_forward(q, k, v, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only lse was used; every rank still joins the ring (its neighbours wait for it)
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(q, k, v, out, lse, dout, dlse, needs=ctx.needs_input_grad[:3], **ctx.opts)
        return dq, dk, dv, None
