"""The family fields read wrong: the mistakes of ports of Qwen, Gemma, GPT-OSS and Phi attention, each a layer-contract
function built on the textbook pipeline (pipeline.py). The bug catalog picks from them (catalog_families.py), and the
diagnosis makes its field suspects of them (harness/verify/diagnosis/fields.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.bugs import pipeline
from impl import rope
from impl.layer import keywords
from impl.projection import ONE_PLUS_W, rms_norm


def without(*names: str) -> Callable:
    """The layer run on the weights with `names` removed: a tensor the port never loads (a bias, a norm, sinks)."""

    def fn(x, weights, *, config, position_ids, attention_mask=None):
        w = {n: t for n, t in weights.items() if n not in names}
        return pipeline.layer()(x, w, config=config, position_ids=position_ids, attention_mask=attention_mask)

    return fn


def with_keywords(change: Callable[[dict, dict], dict]) -> Callable:
    """The pipeline's keywords step with the kernel keywords changed: change(kw, config) -> kw (a window, scale,
    softcap misread)."""
    return lambda config, w: change(keywords(config, w), config)


def head_dim_scale(kw: dict, config: dict) -> dict:
    """query_pre_attn_scalar ignored: the scores scaled by 1/sqrt(head_dim)."""
    return {**kw, "scale": rope.dims(config)[0] ** -0.5}


def no_softcap(kw: dict, config: dict) -> dict:
    return {**kw, "softcap": 0.0}


def no_window(kw: dict, config: dict) -> dict:
    return {n: v for n, v in kw.items() if n != "window"}


def window_everywhere(kw: dict, config: dict) -> dict:
    """The sliding window on every layer, full-attention ones included."""
    W = config.get("sliding_window")
    return {**kw, "window": (W - 1, 0)} if W else kw


def norm_all_heads(q, k, w, config):
    """RMSNorm over all heads' channels at once (OLMo-2 normalises the whole projection), the per-head gain tiled
    across heads."""

    def one(t, g):
        B, n, S, d = t.shape
        flat = t.transpose(1, 2).reshape(B, S, 1, n * d)  # (B, S, 1, n*d): the heads side by side
        out = rms_norm(flat, g.repeat(n), config)  # (B, S, 1, n*d)
        return out.reshape(B, S, n, d).transpose(1, 2)  # (B, n, S, d)

    return (q if w.get("q_norm") is None else one(q, w["q_norm"]),
            k if w.get("k_norm") is None else one(k, w["k_norm"]))  # fmt: skip


def norm_other_gain(q, k, w, config):
    """The other RMSNorm gain: w where the family applies (1 + w) (Gemma), (1 + w) where it applies w."""
    other = {**config, "model_type": "llama" if config.get("model_type") in ONE_PLUS_W else "gemma3"}
    return pipeline.norm(q, k, w, other)


def norm_after_rope(x, weights, *, config, position_ids, attention_mask=None):
    """q/k normed after the rotation instead of before it."""

    def rotate(q, k, v, cos, sin):
        q, k, v = pipeline.rotate(q, k, v, cos, sin)
        return (*pipeline.norm(q, k, weights, config), v)

    return pipeline.layer(norm=lambda q, k, w, c: (q, k), rotate=rotate)(
        x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)


def rotate_all(x, weights, *, config, position_ids, attention_mask=None):
    """Partial rotary ignored: every channel rotated, with frequencies over head_dim."""
    flat = rope.layer_rope(config)
    d, rd = rope.dims(config)
    rp = {**flat["rope_parameters"], "partial_rotary_factor": 1.0}
    for key in ("short_factor", "long_factor"):  # longrope's per-frequency factors, one per rotary pair: the
        if isinstance(rp.get(key), list):  # port stretches them over head_dim's pairs (the last repeated)
            rp[key] = rp[key] + [rp[key][-1]] * ((d - rd) // 2)
    cfg = {**flat, "partial_rotary_factor": 1.0, "rope_parameters": rp}
    return pipeline.layer(tables=lambda c, p, dt: pipeline.tables(cfg, p, dt))(
        x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)


def rotate_last(q, k, v, cos, sin):
    """Partial rotary on the wrong end: the last rotary_dim channels rotated, the first passed through."""

    def rot(t):
        rd = cos.shape[-1]
        return torch.cat((t[..., :-rd], pipeline.rot(t[..., -rd:], cos, sin)), dim=-1)  # (B, n, S, d)

    return rot(q), rot(k), v


def rope_of(layer_type: str) -> Callable:
    """The tables of another layer type's rope parameters (Gemma 3: the global base on a local layer)."""
    return lambda config, position_ids, dtype: pipeline.tables({**config, "layer_type": layer_type}, position_ids,
                                                               dtype)  # fmt: skip

