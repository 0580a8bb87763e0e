"""The mistakes of the kernel contract's three keywords (window, softcap, sinks), as people write them: each a step of
the textbook pipeline (pipeline.py: window, cap, sink_of, sink_softmax) or a whole kernel built from its pieces.
The catalog (catalog.py) names them, says which stage each breaks and what to fix.

    window   the left edge off by one either way ("<= W" for "< W"), the right edge one too far, aligned top-left
             (query i at position i, not Sk - Sq + i), not applied at all
    softcap  applied to the unscaled scores, not applied, applied to the probabilities, applied after the mask (the
             mask's -inf or dtype minimum capped to -softcap: masked keys come back)
    sinks    read by KV head, sign flipped, joined as a key with a value, added after normalising, left out of lse;
             in the backward (verify --grad), the sinks' gradient negated or zero
"""

from __future__ import annotations

import torch

from harness.bugs import pipeline
from harness.bugs.pipeline import Steps
from impl import masks


def _window(Sq, Sk, window, *, offset=None, left_by=0, right_by=0, strict_left=False):
    """window_keep written with one mistake: the queries' offset, or an edge moved."""
    p = torch.arange(Sq)[:, None] + (Sk - Sq if offset is None else offset)  # (Sq, 1)
    j = torch.arange(Sk)[None, :]  # (1, Sk)
    left, right = window
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if left is not None and left >= 0:
        keep = keep & ((p - j < left) if strict_left else (p - j <= left + left_by))
    if right is not None and right >= 0:
        keep = keep & (j - p <= right + right_by)
    return keep[None, None]


def window_one_too_many(Sq, Sk, window):
    return _window(Sq, Sk, window, left_by=1)  # "p - j <= W" with W = left + 1: sliding_window W kept as (W, 0)


def window_one_too_few(Sq, Sk, window):
    return _window(Sq, Sk, window, strict_left=True)  # "p - j < left": the window's last key dropped


def window_right_one_too_many(Sq, Sk, window):
    return _window(Sq, Sk, window, right_by=1)  # the look-ahead's end taken as exclusive: j <= p + right + 1


def window_top_left(Sq, Sk, window):
    return _window(Sq, Sk, window, offset=0)  # query i placed at position i: right only when Sq == Sk


def window_ignored(Sq, Sk, window):
    return torch.ones(1, 1, Sq, Sk, dtype=torch.bool)  # the keyword accepted, never used


def cap_before_scale(s, softcap, scale):
    return scale * (softcap * torch.tanh(s / scale / softcap))  # capped q k^T, scaled after


def cap_missing(s, softcap, scale):
    return s  # the keyword accepted, never used


def sinks_by_kv_head(sinks, H, Hkv):
    return sinks[torch.arange(H) // (H // Hkv)]  # sinks[kv_head]: a kernel whose program walks the KV heads


def sink_sign_flipped(sinks, H, Hkv):
    return -sinks  # exp(-sink) in the denominator


def sink_with_value(s, allowed, sinks):
    """The sink joined as one more key whose value is the first token's (StreamingLLM's sink token), not no value:
    its probability lands on v[0]."""
    p = pipeline.sink_softmax(s, allowed, sinks)  # (B, H, Sq, Sk): the keys' share
    share = 1 - p.sum(dim=-1, keepdim=True)  # the sink's share
    return torch.cat([p[..., :1] + share, p[..., 1:]], dim=-1)


def sink_after_normalising(s, allowed, sinks):
    """The softmax over the keys first, then the sink added to its denominator: p / (1 + exp(sink)), where the sink
    belongs beside the keys' exp(s_j) before dividing."""
    col = sinks.to(s.dtype).reshape(1, -1, 1, 1)
    return masks.masked_softmax(s, allowed) / (1 + torch.exp(col))


def cap_on_probabilities(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0,
                         sinks=None):  # fmt: skip
    """The cap applied to the probabilities after the softmax, not to the scores before it."""
    steps = Steps(cap=cap_missing)
    H, Hkv = q.shape[1], k.shape[1]
    kk, vv = steps.expand(k, H // Hkv), steps.expand(v, H // Hkv)
    s, keep = pipeline.logits(steps, q, kk, causal=causal, scale=scale, attention_mask=attention_mask,
                              window=window, softcap=softcap)  # fmt: skip
    p = masks.masked_softmax(s, keep) if sinks is None else steps.sink_softmax(s, keep, sinks)
    if softcap:
        p = softcap * torch.tanh(p / softcap)
    return steps.aggregate(p, vv)


def cap_after_mask(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0,
                   sinks=None):  # fmt: skip
    """The mask added (as the dtype's minimum, transformers' additive mask) before the cap: masked scores come out
    as -softcap, and masked keys get weight."""
    steps = Steps(cap=cap_missing)
    H, Hkv = q.shape[1], k.shape[1]
    kk, vv = steps.expand(k, H // Hkv), steps.expand(v, H // Hkv)
    s, keep = pipeline.logits(steps, q, kk, causal=causal, scale=scale, attention_mask=attention_mask,
                              window=window)  # fmt: skip
    s = s + torch.zeros_like(s).masked_fill(~keep, torch.finfo(s.dtype).min)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    everything = torch.ones_like(keep)
    p = masks.masked_softmax(s, everything) if sinks is None else steps.sink_softmax(s, everything, sinks)
    return steps.aggregate(p, vv)


def lse_without_sink(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0,
                     sinks=None):  # fmt: skip
    """(out, lse): out right, lse the log of the keys' sum alone, the sink's exp(sinks[h]) left out."""
    out = pipeline.core()(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, window=window,
                          softcap=softcap, sinks=sinks)  # fmt: skip
    H, Hkv = q.shape[1], k.shape[1]
    kk = pipeline.Steps().expand(k, H // Hkv)
    s, keep = pipeline.logits(Steps(), q, kk, causal=causal, scale=scale, attention_mask=attention_mask,
                              window=window, softcap=softcap)  # fmt: skip
    return out, torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1).float()


class SinkGrad(torch.autograd.Function):
    """The sinks as they are, forward; their gradient times `factor` in the backward: a hand-written dsinks with
    its sign lost (-1: dsinks = +sum P_sink D) or never written (0: the sinks taken as a constant)."""

    @staticmethod
    def forward(ctx, sinks, factor):
        ctx.factor = factor
        return sinks.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def dsinks_times(factor: float):
    """The core contract with a right forward and dsinks multiplied by `factor`."""

    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None):
        sinks = None if sinks is None else SinkGrad.apply(sinks, factor)
        return pipeline.core()(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, window=window,
                               softcap=softcap, sinks=sinks)  # fmt: skip

    return attn
