"""The attention layer, one for every family: which of its pieces run is read from the config and the weights.

    projection   impl/projection.py: biases where weights has them, q_norm/k_norm per head, RoPE with the layer's
                 rope parameters (Gemma 3's per layer type, partial rotary, longrope: impl/rope.py)
    kernel       any core of the core contract (impl/__init__.py), given the keywords below
    output       merge heads, o_proj (+ its bias)

The kernel's keywords (`keywords`), each only where the family sets it, so a Llama layer calls its core exactly as
before (no keyword at all):
    window   (W - 1, 0) on a sliding layer: config["layer_type"] == "sliding_attention" with sliding_window = W
             (transformers' sliding window of W keys is the query and the W - 1 before it). Full layers of a model
             with sliding ones (Gemma 2 and 3, GPT-OSS) see every earlier key.
    scale    query_pre_attn_scalar ** -0.5 where the config has it (Gemma 2 and 3: not head_dim ** -0.5 in
             general; Gemma-2-27B scales by 144 ** -0.5 with head_dim 128); otherwise the core's 1 / sqrt(head_dim).
    softcap  attn_logit_softcapping (Gemma 2's 50): scores capped to (-50, 50) by 50 tanh(s / 50) before the mask.
    sinks    weights["sinks"], one logit per query head (GPT-OSS).
"""

from __future__ import annotations

import torch

from impl.gqa import groups
from impl.projection import heads, output, project_qkv


def keywords(config: dict, weights: dict) -> dict:
    """The core's keywords for this layer (the module docstring): window, scale, softcap, sinks, where set."""
    kw = {}
    W = config.get("sliding_window")
    if config.get("layer_type") == "sliding_attention" and W:
        kw["window"] = (W - 1, 0)  # the query and the W - 1 keys before it; causal does the right side
    if config.get("query_pre_attn_scalar"):
        kw["scale"] = config["query_pre_attn_scalar"] ** -0.5
    if config.get("attn_logit_softcapping"):
        kw["softcap"] = float(config["attn_logit_softcapping"])
    if weights.get("sinks") is not None:  # logits: float32 at least, as the cores take them (float64 stays)
        kw["sinks"] = weights["sinks"].to(torch.promote_types(weights["sinks"].dtype, torch.float32))
    return kw


def attention(core, x: torch.Tensor, weights: dict, *, config: dict, position_ids: torch.Tensor,
              attention_mask=None, **options) -> torch.Tensor:  # fmt: skip
    """The plug-in contract around `core`: x (B, S, D) -> (B, S, D). `options` go to the core (block sizes)."""
    groups(*heads(config)[:2])  # H % Hkv != 0 is an error before any work
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2
    ctx = core(q, k, v, attention_mask=attention_mask, **keywords(config, weights), **options)
    ctx = ctx[0] if isinstance(ctx, tuple) else ctx  # cores return out or (out, lse); out (B, H, S, d)
    return output(ctx, weights)  # (B, S, D)
