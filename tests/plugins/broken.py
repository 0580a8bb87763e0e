"""Broken implementations (plug-ins of the contract), each a correct naive attention with one realistic bug.
The harness must fail each and name its stage (tests/test_verify.py)."""

from __future__ import annotations

import torch

from impl import masks, rope
from impl.gqa import repeat_kv
from impl.projection import heads, merge_heads, split_heads


def _attention(
    x,
    w,
    config,
    position_ids,
    attention_mask,
    *,
    scale=None,
    causal=True,
    gqa="interleave",
    rope_mode="half",
    freq_config=None,
    nan_rows=False,
    o_transposed=False,
    padding=True,
):
    H, Hkv, d = heads(config)
    g = H // Hkv
    q = split_heads(x @ w["q_proj"].T, H, d)  # (B, H, S, d)
    k = split_heads(x @ w["k_proj"].T, Hkv, d)
    v = split_heads(x @ w["v_proj"].T, Hkv, d)
    inv, sc = rope.inv_freq(freq_config or config)
    cos, sin = rope.cos_sin(inv, position_ids, sc)
    apply = rope.apply_interleaved if rope_mode == "interleaved" else rope.apply_half
    q, k = apply(q, cos, sin), apply(k, cos, sin)
    if gqa == "tile":
        k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
    else:
        k, v = repeat_kv(k, g), repeat_kv(v, g)
    s = (q @ k.transpose(-2, -1)).float() * (d**-0.5 if scale is None else scale)
    S = x.shape[1]
    allowed = masks.causal(S, S)[None, None] if causal else torch.ones(1, 1, S, S, dtype=torch.bool)
    if attention_mask is not None and padding:
        allowed = allowed & masks.padding(attention_mask)
    if nan_rows:
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)  # all -inf rows -> NaN
    else:
        p = masks.masked_softmax(s, allowed)
    ctx = merge_heads(p.to(v.dtype) @ v)
    return ctx @ (w["o_proj"] if o_transposed else w["o_proj"].T)


def scale_missing(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, scale=1.0)


def no_causal_mask(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, causal=False)


def gqa_repeat(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, gqa="tile")


def interleaved_rope(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, rope_mode="interleaved")


def llama3_missing(x, weights, *, config, position_ids, attention_mask=None):
    rp = config["rope_parameters"]
    plain = dict(config, rope_parameters={"rope_type": "default", "rope_theta": rp["rope_theta"]})
    return _attention(x, weights, config, position_ids, attention_mask, freq_config=plain)


def padding_ignored(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, padding=False)


def nan_on_masked_rows(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, nan_rows=True)


def o_proj_transposed(x, weights, *, config, position_ids, attention_mask=None):
    return _attention(x, weights, config, position_ids, attention_mask, o_transposed=True)


# name -> (plug-in, the stage the harness must name, a fixture on which the bug shows)
EXPECTED = {
    "scale_missing": (scale_missing, "scale", "smollm2-135m"),
    "no_causal_mask": (no_causal_mask, "causal_mask", "smollm2-135m"),
    "gqa_repeat": (gqa_repeat, "gqa", "smollm2-135m"),
    "interleaved_rope": (interleaved_rope, "rope", "smollm2-135m"),
    "llama3_missing": (llama3_missing, "rope_frequencies", "llama-3.2-1b-synthetic"),
    "padding_ignored": (padding_ignored, "padding_mask", "smollm2-135m"),
    "nan_on_masked_rows": (nan_on_masked_rows, "nonfinite", "smollm2-135m"),
    "o_proj_transposed": (o_proj_transposed, "output_projection", "smollm2-135m"),
}
