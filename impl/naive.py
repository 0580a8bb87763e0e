"""Naive attention: the four stages in plain tensor algebra, materialising the S x S score matrix.

    1. projection   q, k, v = x Wq^T (+ bq), ...; split into heads; q_norm/k_norm per head; rotate q and k (RoPE)
    2. scores       q k^T * scale (1/sqrt(d), or the family's)  (each query head against its group's KV head)
    3. mask/softmax causal + padding (+ window, softcap, sinks when asked), softmax in float32 (or wider)
    4. aggregation  probabilities @ v, merge heads, output projection (+ bo)

The layer takes its family's pieces from the config and weights (impl/layer.py): the same code for every family.

Memory: O(B * H * Sq * Sk) for the scores. `return_intermediates=True` also returns every stage's tensor, so the
harness can compare stage by stage with transformers.
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups, repeat_kv
from impl.layer import keywords
from impl.projection import heads, output, project_qkv


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None,
         stages=None):
    """The core contract (impl/__init__.py): q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> context (B, H, Sq, d).

    Scores in float32 (float64 for float64 inputs); window, softcap and sinks as impl/masks.py writes them out.
    """
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    g = groups(H, Hkv)
    masks.check_sinks(sinks, H)
    k, v = repeat_kv(k, g), repeat_kv(v, g)  # (B, H, Sk, d): KV head j -> query heads j*g .. j*g+g-1

    # 2. scores, capped (softcap 0: unchanged)
    wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scores = (q @ k.transpose(-2, -1)).to(wide) * (d**-0.5 if scale is None else scale)  # (B, H, Sq, Sk)
    scores = masks.cap(scores, softcap)

    # 3. mask (causal, window, padding) and softmax (float32), with one sink logit per head in the denominator
    allowed = masks.build(q.shape[2], k.shape[2], attention_mask, q.device, is_causal=causal, window=window)
    sink = None if sinks is None else sinks.to(q.device, wide).view(1, H, 1, 1)  # (1, H, 1, 1): per query head
    probs = masks.masked_softmax(scores, allowed, sink)  # (B, H, Sq, Sk); allowed is (B|1, 1, Sq, Sk)

    # 4. aggregation: weighted sum of values
    ctx = probs.to(v.dtype) @ v  # (B, H, Sq, d)
    if stages is not None:
        stages.update(scores=scores, probs=probs, context=ctx)
    return ctx


def attention(x, weights, *, config, position_ids, attention_mask=None, return_intermediates=False):
    """The plug-in contract: x (B, S, D) -> (B, S, D). See impl/__init__.py."""
    groups(*heads(config)[:2])  # H % Hkv != 0 is an error before any work

    # 1. projection (+ biases), head split, q/k norms, RoPE
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2

    # 2.-4. the kernel with this layer's window, scale, softcap and sinks (impl/layer.py)
    stages = {"q": q, "k": k, "v": v} if return_intermediates else None
    ctx = core(q, k, v, attention_mask=attention_mask, stages=stages, **keywords(config, weights))

    out = output(ctx, weights)  # (B, S, D): merge heads, o_proj (+ bias)
    return (out, stages) if return_intermediates else out
