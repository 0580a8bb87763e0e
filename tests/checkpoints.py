"""Generated Llama-3.2-1B-shaped checkpoints for tests (HF safetensors layout and Meta's original .pth layout)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch

# meta-llama/Llama-3.2-1B config.json as published on the Hub (transformers-4 form, keys in published order).
LLAMA_3_2_1B_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"

_CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome. Paris lies on
the river Seine, and many people visit the city every year to see its museums, its bridges and its old streets.
Attention is a way for a model to look back at the words it has already read. Each word asks a question, called
the query, and every earlier word offers a key and a value. The model compares the query with each key, turns the
scores into weights, and adds up the values with those weights. Large language models stack many such layers, one
after another, and each layer has several heads that can attend to different things at the same time.
A small test should be quick to run and easy to read. When a test fails, the message should say what was expected
and what was found, so that the person reading it knows where to look. Good tests check one thing at a time, use
fixed seeds, and never depend on the network or on the order in which they run.
Once upon a time there was a little house at the edge of a green forest. In the morning the sun came through the
trees, the birds began to sing, and the old dog slept by the door. The children ran down to the river to play with
their boats, and their mother called them home when the bells rang at noon. In the evening they sat by the fire,
told stories about the stars, and counted the days until summer would come again.
Numbers such as one, two, three, four, five, six, seven, eight, nine and ten are written in words here, while
others like 2048, 8192, 128256 and 500000 appear as digits. The weather today is cold and windy, with rain in the
north and clear skies in the south; tomorrow it will be warmer, and by the weekend the roads should be dry.
"""


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: a tensor's values depend only on (seed, name), not on the layer count or sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _randn(shape, seed: int, name: str, std: float, mean: float = 0.0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std + mean).to(dtype).contiguous()


def _build_config(num_layers: int, vocab_size: int, dtype: torch.dtype, overrides: dict | None) -> dict:
    cfg = copy.deepcopy(LLAMA_3_2_1B_CONFIG)
    cfg["num_hidden_layers"], cfg["vocab_size"] = num_layers, vocab_size
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    overrides = dict(overrides or {})
    # A smaller hidden_size / head count without an explicit head_dim keeps head_dim = hidden_size / heads.
    if ({"hidden_size", "num_attention_heads"} & overrides.keys()) and "head_dim" not in overrides:
        heads = overrides.get("num_attention_heads", cfg["num_attention_heads"])
        overrides["head_dim"] = overrides.get("hidden_size", cfg["hidden_size"]) // heads
    cfg.update(overrides)
    return cfg


def _hf_tensors(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    tensors = {
        "model.embed_tokens.weight": _randn((vocab, hidden), seed, "model.embed_tokens.weight", 0.02, dtype=dtype)
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q_out, hidden),
            "self_attn.k_proj.weight": (kv_out, hidden),
            "self_attn.v_proj.weight": (kv_out, hidden),
            "self_attn.o_proj.weight": (hidden, q_out),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            tensors[p + norm] = _randn((hidden,), seed, p + norm, 0.1, mean=1.0, dtype=dtype)
        for name, shape in shapes.items():  # nn.Linear weights are [out, in]; std ~ 1/sqrt(fan_in)
            tensors[p + name] = _randn(shape, seed, p + name, 1.0 / math.sqrt(shape[1]), dtype=dtype)
    tensors["model.norm.weight"] = _randn((hidden,), seed, "model.norm.weight", 0.1, mean=1.0, dtype=dtype)
    if not cfg.get("tie_word_embeddings", True):
        tensors["lm_head.weight"] = _randn(
            (vocab, hidden), seed, "lm_head.weight", 1.0 / math.sqrt(hidden), dtype=dtype
        )
    return tensors


def _write_tokenizer(out: Path, vocab_size: int) -> tuple[int, int]:
    """Byte-level BPE trained on _CORPUS; BOS/EOS are appended after the learned vocab. Returns (bos_id, eos_id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError("vocab_size must be >= 258 (256 byte tokens + BOS + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096) - 2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(_CORPUS.split())], trainer)
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, bos)]
    )
    assert eos < vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN).save_pretrained(out)
    return bos, eos


def make_hf_checkpoint(
    out: Path,
    *,
    num_layers: int = 2,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    sharded: bool | int = False,
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """Write an HF-format Llama checkpoint (config.json, tokenizer, safetensors) into `out`; returns `out`.

    The config is LLAMA_3_2_1B_CONFIG with num_hidden_layers / vocab_size / torch_dtype replaced, then
    `config_overrides` applied (overriding hidden_size or num_attention_heads without head_dim also sets
    head_dim = hidden_size // num_attention_heads).  bos/eos_token_id are set to the generated tokenizer's ids when
    the published 128000/128001 do not fit in vocab_size.  `sharded=True` writes 2 shards (an int >= 2 picks the
    count) plus model.safetensors.index.json; embeddings go in the first shard, the final norm in the last, layers
    are split in contiguous runs.  Same arguments -> byte-identical files.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _build_config(num_layers, vocab_size, dtype, config_overrides)
    bos, eos = _write_tokenizer(out, cfg["vocab_size"])
    if cfg["bos_token_id"] >= cfg["vocab_size"] or cfg["eos_token_id"] >= cfg["vocab_size"]:
        cfg["bos_token_id"], cfg["eos_token_id"] = bos, eos
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = _hf_tensors(cfg, seed, dtype)
    meta = {"format": "pt"}
    if not sharded:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return out

    n_shards = 2 if sharded is True else int(sharded)
    n_layers = cfg["num_hidden_layers"]
    if n_shards < 2:
        raise ValueError("sharded must be True or an int >= 2")

    def shard_of(name: str) -> int:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            return min(layer * n_shards // max(n_layers, 1), n_shards - 1)
        return n_shards - 1 if name in ("model.norm.weight", "lm_head.weight") else 0

    weight_map, shards = {}, [dict() for _ in range(n_shards)]
    for name, t in tensors.items():
        shards[shard_of(name)][name] = t
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def load_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        tensors.update(load_file(str(hf_dir / f)))
    return tensors


def meta_ffn_hidden_dim(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's FeedForward hidden size (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, intermediate: int) -> tuple[float | None, int]:
    """(ffn_dim_multiplier, multiple_of) such that meta_ffn_hidden_dim reproduces `intermediate`.

    Tries Llama-3's (1.5, 256) first, then no multiplier, then short decimal multipliers, largest multiple_of first;
    multiple_of=1 with a multiplier nudged up by half a unit always works, so the result is always exact."""
    candidates = [(1.5, 256)] + [(None, m) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)]
    base = int(2 * (4 * dim) / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if intermediate % m == 0:
            candidates += [(round(intermediate / base, k), m) for k in range(1, 7)]
    candidates.append(((intermediate + 0.5) / base, 1))
    for mult, m in candidates:
        if meta_ffn_hidden_dim(dim, mult, m) == intermediate:
            return mult, m
    raise ValueError(f"cannot express intermediate_size={intermediate} with Meta's FFN formula for dim={dim}")


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split RoPE row order -> Meta's interleaved order.

    Inverse of transformers' convert_llama_weights_to_hf.py
    ``permute(w, n_heads, dim1, dim2) =
    w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)``
    i.e. ``w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)``.
    Used with n_heads = num_attention_heads for wq and num_key_value_heads for wk.
    """
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2).contiguous()


def hf_to_meta(hf_dir: Path, out: Path) -> Path:
    """Write Meta's original layout (like meta-llama repos' ``original/``) from an HF checkpoint; returns `out`.

    Files: consolidated.00.pth (torch.save of {name: tensor}, same dtype, every tensor its own storage) and
    params.json.  wq/wk are converted from HF's half-split RoPE row order back to Meta's interleaved order with
    unpermute_rope (the inverse of transformers' convert_llama_weights_to_hf.py permute; wq with n_heads, wk with
    n_kv_heads); every other tensor is copied unchanged.  output.weight is a copy of the embeddings when tied.
    params.json's ffn_dim_multiplier / multiple_of reproduce intermediate_size through Meta's formula
    (meta_ffn_hidden_dim); the hidden size is also the shape of layers.*.feed_forward.w1.weight.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    dim, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if cfg.get("head_dim", dim // n_heads) * n_heads != dim:
        raise ValueError("Meta's format requires head_dim == hidden_size / num_attention_heads")
    hf = load_hf_tensors(hf_dir)
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"].clone()}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[q + "attention.wq.weight"] = unpermute_rope(hf[p + "self_attn.q_proj.weight"], n_heads)
        sd[q + "attention.wk.weight"] = unpermute_rope(hf[p + "self_attn.k_proj.weight"], n_kv)
        sd[q + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"].clone()
        sd[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"].clone()
        sd[q + "feed_forward.w1.weight"] = hf[p + "mlp.gate_proj.weight"].clone()
        sd[q + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"].clone()
        sd[q + "feed_forward.w3.weight"] = hf[p + "mlp.up_proj.weight"].clone()
        sd[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"].clone()
        sd[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"].clone()
    sd["norm.weight"] = hf["model.norm.weight"].clone()
    sd["output.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"]).clone()

    mult, multiple_of = _ffn_params(dim, cfg["intermediate_size"])
    params = {
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "vocab_size": cfg["vocab_size"],
    }
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    params.update(multiple_of=multiple_of, norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"])
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(out / "consolidated.00.pth"))
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return out


# Small configs of the families e2e swaps into beyond Llama (transformers 5 names), for make_family_checkpoint:
# every feature of the family's layer on: Gemma 3's sliding layers with a window shorter than the prompts, its RoPE
# per layer type, query_pre_attn_scalar != head_dim; Mistral's window on every layer; Qwen2's biases; Qwen3's norms.
FAMILY_CONFIGS: dict[str, dict] = {
    "gemma3_text": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 3, "max_position_embeddings": 512, "sliding_window": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "query_pre_attn_scalar": 24,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    },
    "mistral": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2, "max_position_embeddings": 512, "sliding_window": 5,
    },
    "qwen2": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 512,
    },
    "qwen3": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2, "max_position_embeddings": 512,
    },
}  # fmt: skip


def make_family_checkpoint(out: Path, model_type: str, *, vocab_size: int = 512, seed: int = 0,
                           overrides: dict | None = None) -> Path:  # fmt: skip
    """Write an HF checkpoint (config.json, tokenizer, float32 safetensors) of a small model of the family
    (FAMILY_CONFIGS[model_type] | overrides) with seeded random weights into `out`; returns `out`.

    Matrices ~ N(0, 1/fan_in); RMSNorm gains around their identity (Gemma's w around 0, applied as 1 + w; the
    others' around 1) but far enough from it that a gain applied the other family's way changes the output;
    biases, sinks ~ N(0, 0.1). The embedding ~ N(0, 1/hidden) times Gemma's sqrt(hidden) scale where it has one.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = _write_tokenizer(out, vocab_size)
    kw = FAMILY_CONFIGS[model_type] | (overrides or {})
    # room for the special tokens a family's own tokenizer class adds (Qwen2Tokenizer: <|endoftext|> as padding)
    cfg = CONFIG_MAPPING[model_type](**kw, vocab_size=vocab_size + 16, bos_token_id=bos, eos_token_id=eos,
                                     pad_token_id=None, tie_word_embeddings=True)  # fmt: skip
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2:
                p.copy_(_randn(p.shape, seed, name, 1.0 / math.sqrt(p.shape[1]), dtype=torch.float32))
            elif "norm" in name:
                p.copy_(_randn(p.shape, seed, name, 0.3, mean=0.0 if gemma else 1.0, dtype=torch.float32))
            else:
                p.copy_(_randn(p.shape, seed, name, 0.1, dtype=torch.float32))
    lm.save_pretrained(out)
    return out
