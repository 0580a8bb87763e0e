"""Backward bugs: autograd Functions whose forward is right and whose backward has one realistic mistake.

`Attention` is the kernel (the core contract) with FlashAttention-2's backward written out whole, in the order it
runs; a bug switches one line of it. `Rotate` and `Linear` are RoPE and a projection with hand-written backwards,
for the bugs that live outside the kernel. The catalog (catalog.py) turns each mistake into an entry.

    P  = exp(scale q k^T - lse), masked            recomputed from the saved lse
    D  = rowsum(dO * O)
    dV = P^T dO                                    summed over the query heads of each KV head (GQA)
    dP = dO V^T
    dS = P * (dP - D)
    dQ = scale dS K,  dK = scale dS^T Q            dK summed over the group too
"""

from __future__ import annotations

import torch

from impl import masks, rope


def _group(t: torch.Tensor, Hkv: int, how: str) -> torch.Tensor:
    """(B, H, S, d) gradients of the repeated K/V -> (B, Hkv, S, d): each KV head's query heads summed."""
    B, H, S, d = t.shape
    t = t.view(B, Hkv, H // Hkv, S, d)  # (B, Hkv, g, S, d)
    if how == "first":
        return t[:, :, 0] * 1  # only the first query head of the group reaches its KV head
    if how == "mean":
        return t.mean(2)  # averaged where the heads share K/V: each contributes in full
    return t.sum(2)


class Attention(torch.autograd.Function):
    """q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> out (B, H, Sq, d), with `bug` switching one line of the backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, bug):
        g = q.shape[1] // k.shape[1]
        f = torch.promote_types(q.dtype, torch.float32)
        kk, vv = k.repeat_interleave(g, 1).to(f), v.repeat_interleave(g, 1).to(f)  # (B, H, Sk, d)
        s = (q.to(f) @ kk.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
        allowed = masks.build(q.shape[2], k.shape[2], mask, q.device, is_causal=causal)
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq), -inf where nothing is allowed
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        out = (p @ vv).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.bug = causal, scale, bug
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        bug, scale, Hkv = ctx.bug, ctx.scale, k.shape[1]
        g = q.shape[1] // Hkv
        f = lse.dtype
        kk, vv = k.repeat_interleave(g, 1).to(f), v.repeat_interleave(g, 1).to(f)
        do, o = dout.to(f), out.to(f)
        # P, recomputed from lse and masked like the forward
        allowed = masks.build(q.shape[2], k.shape[2], None if bug == "padding_dropped" else mask, q.device,
                              is_causal=ctx.causal and bug != "causal_dropped")  # fmt: skip
        s = ((q.to(f) @ kk.transpose(-2, -1)) * scale).masked_fill(~allowed, float("-inf"))
        shift = lse if bug == "nan_rows" else torch.where(torch.isfinite(lse), lse, 0.0)  # -inf - -inf = NaN
        p = torch.exp(s - shift[..., None])  # (B, H, Sq, Sk), 0 where masked
        D = (do * o).sum(-1, keepdim=True)  # (B, H, Sq, 1)
        if bug == "no_D":
            D = torch.zeros_like(D)
        dv = p.transpose(-2, -1) @ do  # (B, H, Sk, d)
        dp = do @ vv.transpose(-2, -1)  # (B, H, Sq, Sk)
        ds = p * (dp - D)
        c = {"scale_missing": 1.0, "scale_twice": scale * scale}.get(bug, scale)
        dq = c * (ds @ kk)  # (B, H, Sq, d)
        dk = c * (ds.transpose(-2, -1) @ q.to(f))  # (B, H, Sk, d)
        how = {"gqa_first": "first", "gqa_mean": "mean"}.get(bug, "sum")
        dk, dv = _group(dk, Hkv, how), _group(dv, Hkv, how)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def kernel(bug: str | None):
    """The core contract, computed by Attention with this backward bug (None: correct)."""

    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None):
        return Attention.apply(q, k, v, attention_mask, causal, q.shape[-1] ** -0.5 if scale is None else scale, bug)

    return attn


class Rotate(torch.autograd.Function):
    """RoPE with its own backward: the gradient goes back through the inverse rotation (sin negated)."""

    @staticmethod
    def forward(ctx, x, cos, sin, bug):
        ctx.save_for_backward(cos, sin)
        ctx.bug = bug
        return rope.apply_half(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        back = sin if ctx.bug == "forward_rotation" else -sin  # the rotation's transpose is the rotation by -angle
        return rope.apply_half(grad, cos, back), None, None, None


class Linear(torch.autograd.Function):
    """y = x W^T with its own backward: grad_x = grad_y W, grad_W = grad_y^T x."""

    @staticmethod
    def forward(ctx, x, w, bug):
        ctx.save_for_backward(x, w)
        ctx.bug = bug
        return x @ w.T

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gy @ (w.T if ctx.bug == "input_transposed" else w)  # square weights make the mistake fit
        gw = gy.flatten(0, -2).T @ x.flatten(0, -2)
        if ctx.bug == "weight_unsummed":
            gw = gy[0].T @ x[0]  # only the batch's first sequence
        return gx, gw, None
