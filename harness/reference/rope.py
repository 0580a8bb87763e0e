"""Rotary tables for the references: transformers' own rotary embedding of the family (per layer type for Gemma 3)
in the dtype, and float64 tables from float64 frequencies for the float64 reference.

transformers' rope init functions only produce float32; impl.rope reproduces them bit for bit in float32 (tested)
and evaluates the same formulas in float64 here (LongRoPE included: short factors up to
original_max_position_embeddings, long ones past it, as transformers switches on max(position_ids) + 1).
"""

from __future__ import annotations

import torch

from harness.reference.family import FULL, family, hf_config, layer_rope, layer_type
from impl.rope import cos_sin, inv_freq


def rotary(config: dict, layer: int, cfg=None):
    """The family's rotary embedding for the layer: a function (x, position_ids) -> (cos, sin)."""
    fam = family(config)
    cfg = cfg if cfg is not None else hf_config(config)
    rope = fam.cls("RotaryEmbedding")(cfg)
    if fam.model_type == "gemma3_text":  # one table per layer type
        lt = layer_type(config, layer)
        return lambda x, pos: rope.to(x.device)(x, pos, lt)
    return lambda x, pos: rope.to(x.device)(x, pos)


def hf_inv_freq(config: dict, layer: int) -> torch.Tensor:
    """The inverse frequencies transformers' rotary embedding holds for the layer at init (float32)."""
    fam = family(config)
    rope = fam.cls("RotaryEmbedding")(hf_config(config))
    if fam.model_type == "gemma3_text":
        return getattr(rope, f"{layer_type(config, layer)}_inv_freq").float()
    return rope.inv_freq.float()


def flat(config: dict, layer: int) -> dict:
    """The config with the layer's own rope parameters flat (what impl.rope reads)."""
    return {**config, "rope_parameters": layer_rope(config, layer)}


def float64_tables(config: dict, position_ids: torch.Tensor, layer: int | None = None):
    """cos, sin [B, S, rotary_dim] in float64 for the layer (layer None: config's layer_idx, else 0)."""
    layer = config.get("layer_idx", 0) if layer is None else layer
    cfg = flat(config, layer)
    seq_len = int(position_ids.max()) + 1
    inv, scaling = inv_freq(cfg, seq_len=seq_len, dtype=torch.float64)  # longrope included
    cos, sin = cos_sin(inv.to(position_ids.device), position_ids, scaling, dtype=torch.float64)
    if family(config).model_type == "gpt_oss":  # its tables hold each angle once (it rotates the halves itself)
        half = cos.shape[-1] // 2
        return cos[..., :half], sin[..., :half]
    return cos, sin


__all__ = ["FULL", "float64_tables", "hf_inv_freq", "rotary"]
