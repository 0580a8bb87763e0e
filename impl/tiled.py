"""FlashAttention-2-style attention in pure PyTorch, forward and backward: tiles, never an S x S matrix.

The forward (impl/tiled_forward.py) streams key blocks through an online softmax, keeping per query row a running
max, a running sum and an unnormalised output, and returns out and lse; the backward (impl/tiled_backward.py)
recomputes each probability tile from lse and accumulates dQ, dK, dV (FlashAttention-2's Algorithms 1 and 2, written
out in those files). `FlashAttention` (a torch.autograd.Function) ties the two passes together; `core` uses it only
when a gradient is wanted, so a forward under no_grad (or with inputs that need no gradient) is flash_forward itself.

The kernel contract's variants (impl/masks.py has their math):
- window (left, right): query block i visits only the key blocks that hold a key some of its rows may see
  (tiles.key_span), so for a fixed window the work per query block is fixed and the whole pass grows linearly with
  the sequence; only the tiles that cross the window's edges (the causal diagonal is the right edge at 0) get a
  mask. Causal is the window (-1, 0), so plain causal attention runs the very same code.
- softcap c: the score GEMM's alpha is scale / c, then tanh_ and times c, in place; the mask is added after, as in
  Gemma 2. The backward keeps the tanh to multiply dS by its derivative, 1 - tanh^2.
- sinks: the sink is the first logit each row sees: the running max starts at it and the running sum at 1
  (exp(sink - sink)), with nothing added to the output. So lse = m + log l counts it once, a row that sees no key
  gives out = 0 and lse = sink, and the backward's P = exp(S - lse) is right as it stands.

Why it is shaped the way it is (each point was measured; docs/bench.md has the resulting times):
- The 1/sqrt(d) scale is applied inside the score matmul (baddbmm's alpha), so no per-tile scaling pass, and
  the scores round exactly as transformers' (q k^T) * scale do (softcap: scale / c in one rounding, against
  Gemma 2's two); the backward recomputes them the same way (tiles.score_tile for both), so its P uses the very
  scores the forward's lse was taken over. dQ and dK take the scale as baddbmm_'s alpha too.
- Tile sizes: the forward's score tile is about 1 MiB (tiles.TILE_BYTES): it takes as many (batch, KV head)
  pairs as fit, one for Llama-3.2-1B at 128 x 512, so a head's K and V stay in cache across its query blocks.
- exp is taken in place after the max (forward) or the lse (backward) is subtracted: exp_ is cheaper than the
  mul_ by log2(e) plus exp2_ that an exp2 costs (measured on torch 2.13, single thread: sub_+exp_ 0.68 ms against
  sub_+mul_+exp2_ 0.97 ms per (8, 512, 256) tile); folding log2(e) into q instead would add an error proportional
  to |score| to every exponent, enough to fail the x50-scaled scores scenario's 1e-3 tolerance.
- Masks are added as 0 / -inf biases (an add over the tile is much cheaper than masked_fill_ here), the edge ones
  built from two aranges, once per call for each tile position relative to the edges (a dict that lives for one
  call: no Python state outlives it).
- GQA: the g query heads of a KV head are stacked into one block of g*bq rows, so each K/V tile is read once
  per group and never repeated; the tile matmuls are batched over the (batch, KV head) pairs of a tile. In the
  backward the stacking sums dK and dV over the g heads inside the matmul (the reduction runs over all g*bq rows).
- In place: the tile is exponentiated where it lies and the products are added into their accumulators by
  baddbmm_, so a tile costs one new buffer in the forward and two (P and dS) in the backward (three with softcap).
Half-precision inputs: the tile matmuls run in the input dtype, m, l, acc, D, dS and the dQ/dK/dV accumulators in
float32 (P and dS are rounded to the input dtype for their matmuls, as FlashAttention does); one exception, dP = dO V^T
takes the half values in float32 (step 3 of flash_backward says why). Gradients are returned in the input dtype,
dsinks in the sinks' (float32). float64 inputs are computed in float64 throughout (gradcheck needs it), lse included.
Memory: forward, one score tile (about TILE_BYTES) plus the output; backward,
two (B*Hkv, g*bq, bk) tiles plus dq, dk, dv (float32 buffers for dk, dv when the inputs are half) and one query block
of q, dO and dQ.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from impl import layer
from impl.tiled_backward import flash_backward
from impl.tiled_forward import flash_forward
from impl.tiles import BLOCK_K, BLOCK_Q, FORWARD_BLOCK_K, forward_heads

__all__ = ["BLOCK_K", "BLOCK_Q", "FORWARD_BLOCK_K", "FlashAttention", "attention", "core", "flash_backward",
           "flash_forward"]  # fmt: skip


class FlashAttention(torch.autograd.Function):
    """(out, lse) = flash_forward(q, k, v, ...), differentiable in q, k, v and sinks through flash_backward.

    Saves q, k, v, sinks, out and lse (O(S d) memory, nothing S x S). No gradient for attention_mask, causal, scale,
    window, softcap or the block sizes. Twice differentiable it is not (once_differentiable: a second backward
    raises).
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, attention_mask, opts):
        out, lse = flash_forward(q, k, v, attention_mask, sinks=sinks, **opts)  # not recorded: in-place is fine
        ctx.save_for_backward(q, k, v, sinks, out, lse, attention_mask)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse, attention_mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 6
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        o = ctx.opts
        n = forward_heads(q.shape[0] * k.shape[1], q.shape[1] // k.shape[1], o["block_q"], o["block_k"], q.dtype)
        grads = flash_backward(q, k, v, out, lse, dout, dlse, attention_mask, sinks=sinks,
                               needs=ctx.needs_input_grad[:4], score_heads=n, **o)  # fmt: skip
        return (*grads, None, None)  # dq, dk, dv, dsinks; none for attention_mask and the options


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None,
         block_q=None, block_k=None):  # fmt: skip
    """The core contract: returns (out (B, H, Sq, d), lse (B, H, Sq) float32), differentiable in q, k, v, sinks.

    The autograd Function is used only when a gradient is wanted (grad mode on and q, k, v or sinks requiring grad);
    otherwise this is flash_forward itself, nothing added. Block sizes given apply to both passes; None means each
    pass's own default (BLOCK_Q rows; FORWARD_BLOCK_K keys forward, BLOCK_K backward). float64 inputs give a
    float64 lse.
    """
    opts = dict(block_q=block_q, block_k=block_k, causal=causal, scale=scale, window=window, softcap=softcap)
    wants = [t.requires_grad for t in (q, k, v, sinks) if t is not None]
    if torch.is_grad_enabled() and any(wants):
        return FlashAttention.apply(q, k, v, sinks, attention_mask, opts)
    return flash_forward(q, k, v, attention_mask, sinks=sinks, **opts)


def attention(x, weights, *, config, position_ids, attention_mask=None, block_q=None, block_k=None):
    """The plug-in contract (the one layer, impl/layer.py, around this core), with configurable block sizes;
    differentiable (projections, norms and biases through autograd, the kernel through FlashAttention)."""
    return layer.attention(core, x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask,
                           block_q=block_q, block_k=block_k)  # fmt: skip
