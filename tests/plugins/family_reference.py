"""A "reference plug-in": the layer contract met by the family's own transformers attention module (Qwen2Attention,
Qwen3Attention, MistralAttention, Gemma2Attention, Gemma3Attention, GptOssAttention, Phi3Attention, LlamaAttention),
written from the contract alone: the config's model_type picks the classes, its layer_idx / layer_type the rotary
table and the window, transformers' masking_utils builds the mask (not the harness's). It must pass `verify` on every
family's fixture through --impl (attention) and --module (build); `attention_without_bias` zeroes the projections'
biases and must fail where a family has them (tests/test_families_fixtures.py)."""

import importlib

import torch
from transformers import masking_utils as mu
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
          "gemma3_text": "Gemma3", "gpt_oss": "GptOss", "phi3": "Phi3"}  # fmt: skip
PACKAGE = {"gemma3_text": "gemma3"}
HARNESS_KEYS = ("layer_idx", "layer_type", "max_batch_size", "max_seq_len", "max_position")


def _classes(model_type: str):
    pkg = PACKAGE.get(model_type, model_type)
    mod = importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}")
    return getattr(mod, PREFIX[model_type] + "Attention"), getattr(mod, PREFIX[model_type] + "RotaryEmbedding")


def _state(weights: dict, fused: bool) -> dict:
    sd = {}
    for n, w in weights.items():
        sd[n if n.endswith(".bias") or n == "sinks" else f"{n}.weight"] = w
    if fused:  # Phi-3's module holds q, k, v as one qkv_proj
        sd["qkv_proj.weight"] = torch.cat([sd.pop(f"{n}_proj.weight") for n in "qkv"])
    return sd


def build(config: dict, weights: dict):
    mt = config.get("model_type", "llama")
    cfg = CONFIG_MAPPING[mt].from_dict({k: v for k, v in config.items() if k not in HARNESS_KEYS})
    cfg._attn_implementation = "eager"
    Attention, Rotary = _classes(mt)
    dtype = weights["q_proj"].dtype
    with torch.device("meta"):  # no weights of its own: each call runs it on the weights given (functional_call),
        attn = Attention(cfg, config["layer_idx"]).to(dtype).eval()  # so gradients reach them
    state = _state(weights, mt == "phi3")
    rope = Rotary(cfg)
    lt = config["layer_type"]
    W = config.get("sliding_window") if lt == "sliding_attention" else None

    def layer(x, position_ids, attention_mask=None):
        B, S, _ = x.shape
        fn = mu.sliding_window_causal_mask_function(W) if W else mu.causal_mask_function
        keep = mu.sdpa_mask(batch_size=B, q_length=S, kv_length=S, q_offset=0, kv_offset=0, mask_function=fn,
                            attention_mask=None if attention_mask is None else attention_mask.bool(),
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # fmt: skip
        mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        r = rope.to(x.device)
        cos_sin = r(x, position_ids, lt) if mt == "gemma3_text" else r(x, position_ids)
        kw = {"position_embeddings": cos_sin, "attention_mask": mask.to(x.device)}
        return torch.func.functional_call(attn, state, (x,), kw)[0]

    return layer


def attention(x, weights, *, config, position_ids, attention_mask=None):
    return build(config, weights)(x, position_ids, attention_mask)


def attention_without_bias(x, weights, *, config, position_ids, attention_mask=None):
    """The classic port bug: the projections' biases left out (zeroed)."""
    weights = {n: torch.zeros_like(w) if n.endswith(".bias") else w for n, w in weights.items()}
    return attention(x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)
