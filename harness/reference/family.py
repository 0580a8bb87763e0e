"""The model families the harness verifies: for each transformers model_type, its own attention and rotary classes
and the attention fields its layer carries, read off the fixture's config (transformers 5 names).

    model_type    classes (<Prefix>Attention, ...)  tensors beyond q/k/v/o_proj                   layer types
    llama         Llama                             -                                              full
    mistral       Mistral                           -                                              sliding if window
    qwen2         Qwen2                             q/k/v_proj.bias (always)                       layer_types
    qwen3         Qwen3                             q_norm, k_norm (w); biases if attention_bias   layer_types
    gemma2        Gemma2                            biases if attention_bias                       layer_types
    gemma3_text   Gemma3                            q_norm, k_norm (1 + w); biases if ...          layer_types (RoPE
                                                                                                   per layer type)
    gpt_oss       GptOss                            sinks [H]; biases if attention_bias            layer_types
    phi3          Phi3                              - (qkv_proj fused in the checkpoint)           sliding if window

A layer's type: config["layer_types"][layer] where the family has them, else "sliding_attention" when the family
windows every layer (mistral, phi3) and sliding_window is set, else "full_attention" (the family's Model builds
the mask the same way: create_sliding_window_causal_mask for sliding layers, create_causal_mask for the others).
Imports no transformers at import time: the classes are looked up when a reference is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

FULL, SLIDING = "full_attention", "sliding_attention"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
BIASES = tuple(f"{n}.bias" for n in PROJ)
# keys the harness adds to a fixture's config for the code under test (never transformers fields)
CONTRACT_KEYS = ("layer_idx", "layer_type", "max_batch_size", "max_seq_len", "max_position")


@dataclass(frozen=True)
class Family:
    model_type: str
    package: str  # transformers.models.<package>.modeling_<package>
    prefix: str  # class names: <prefix>Attention, <prefix>RotaryEmbedding, <prefix>DecoderLayer, <prefix>RMSNorm
    biases: str = "none"  # "none" | "qkv" (always q, k, v) | "config" (all four when attention_bias)
    qk_norm: bool = False  # q_norm, k_norm over head_dim, per head, before RoPE
    norm_plus_one: bool = False  # Gemma's RMSNorm: x / rms * (1 + w)
    sinks: bool = False  # one learned logit per query head (GPT-OSS)
    fused_qkv: bool = False  # the checkpoint holds qkv_proj (Phi-3); the fixture splits it
    window_every_layer: bool = False  # no layer_types: every layer is windowed when sliding_window is set
    embed_scale: bool = False  # the embeddings are multiplied by sqrt(hidden_size) (Gemma)

    def module(self):
        return importlib.import_module(f"transformers.models.{self.package}.modeling_{self.package}")

    def cls(self, what: str):
        """The family's transformers class: what in Attention, RotaryEmbedding, DecoderLayer, RMSNorm."""
        return getattr(self.module(), f"{self.prefix}{what}")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "llama", "Llama"),
    Family("mistral", "mistral", "Mistral", window_every_layer=True),
    Family("qwen2", "qwen2", "Qwen2", biases="qkv"),
    Family("qwen3", "qwen3", "Qwen3", biases="config", qk_norm=True),
    Family("gemma2", "gemma2", "Gemma2", biases="config", embed_scale=True),
    Family("gemma3_text", "gemma3", "Gemma3", biases="config", qk_norm=True, norm_plus_one=True, embed_scale=True),
    Family("gpt_oss", "gpt_oss", "GptOss", biases="config", sinks=True),
    Family("phi3", "phi3", "Phi3", fused_qkv=True, window_every_layer=True),
)}  # fmt: skip


def family(config: dict) -> Family:
    """The config's family (model_type; absent: llama, as the first fixtures were written). KeyError if unknown:
    validate.py refuses such a config first, in one line."""
    return FAMILIES[config.get("model_type") or "llama"]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def layer_type(config: dict, layer: int) -> str:
    """full_attention or sliding_attention, as the family's Model decides for layer `layer`."""
    if config.get("layer_type") in (FULL, SLIDING) and config.get("layer_idx") == layer:
        return config["layer_type"]
    types = config.get("layer_types")
    if isinstance(types, list) and 0 <= layer < len(types):
        return SLIDING if types[layer] == SLIDING else FULL
    if family(config).window_every_layer and config.get("sliding_window"):
        return SLIDING
    return FULL


def window(config: dict, layer: int) -> int | None:
    """transformers' sliding_window W of the layer (key j visible from query i iff i - W < j <= i), or None."""
    if layer_type(config, layer) != SLIDING:
        return None
    return config.get("sliding_window") or None


def layer_config(config: dict, layer: int) -> dict:
    """What the code under test is handed: the fixture's config plus layer_idx and layer_type (names exact)."""
    return {**config, "layer_idx": layer, "layer_type": layer_type(config, layer)}


def layer_rope(config: dict, layer: int | None = None) -> dict:
    """The layer's rope parameters, flat ({"rope_type": ..., "rope_theta": ...}): config["rope_parameters"] itself,
    or its entry for the layer's type where the family keys them by layer type (Gemma 3). The harness's private
    equivalent of impl.rope.layer_rope(config) (helper B's), which takes layer_type from the config."""
    rp = config["rope_parameters"]
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):
        lt = config.get("layer_type") if layer is None else layer_type(config, layer)
        return rp[lt or FULL]
    return rp


def extra_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors a layer of this family carries beyond q/k/v/o_proj, with their shapes."""
    fam = family(config)
    H, Hkv, d, D = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config), config["hidden_size"]
    out: dict[str, tuple[int, ...]] = {}
    if fam.biases == "qkv" or (fam.biases == "config" and config.get("attention_bias")):
        out |= {"q_proj.bias": (H * d,), "k_proj.bias": (Hkv * d,), "v_proj.bias": (Hkv * d,)}
        if fam.biases == "config":
            out["o_proj.bias"] = (D,)
    if fam.qk_norm:
        out |= {"q_norm": (d,), "k_norm": (d,)}
    if fam.sinks:
        out["sinks"] = (H,)
    return out


def state_dict(config: dict, weights: dict) -> dict:
    """The contract's weights -> the family's attention module's state dict (Phi-3: q/k/v fused into qkv_proj)."""
    sd = {}
    for name, w in weights.items():
        if name in PROJ:
            sd[f"{name}.weight"] = w
        elif name in BIASES:
            sd[name] = w
        elif name in ("q_norm", "k_norm"):
            sd[f"{name}.weight"] = w
        elif name == "sinks":
            sd["sinks"] = w
    if family(config).fused_qkv:
        sd["qkv_proj.weight"] = torch_cat([sd.pop("q_proj.weight"), sd.pop("k_proj.weight"), sd.pop("v_proj.weight")])
    return sd


def torch_cat(parts):
    import torch  # lazy: this module imports nothing heavy at import time

    return torch.cat(parts, 0)  # (H*d + 2*Hkv*d, hidden)


def hf_config(config: dict, attn_implementation: str = "eager"):
    """transformers' config object of the family (its own class), with the attention implementation set."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # lazy: transformers is slow to import

    cls = CONFIG_MAPPING[family(config).model_type]
    cfg = cls.from_dict({k: v for k, v in config.items() if k not in CONTRACT_KEYS})
    cfg._attn_implementation = attn_implementation
    return cfg


def config_class_name(config: dict) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # lazy: transformers is slow to import

    return CONFIG_MAPPING[family(config).model_type].__name__
