"""A fixture's config.json, checked before any work: every field a pipeline reads, for type and range, so bad input
is one line naming the file, the field and the fix (exit 2), never a traceback halfway through a run.

    shapes          head counts and sizes (integers, > 0, H a multiple of Hkv, even head_dim), max_position_embeddings
    rope_parameters per rope_type (default, linear, dynamic, llama3, yarn, longrope), flat or keyed by layer type
                    (Gemma 3: one entry per layer type, each checked)
    the family      model_type one of the families the harness verifies (reference/family.py); absent: llama
    its fields      sliding_window (a positive integer or null), layer_types (full_attention / sliding_attention,
                    one per layer), query_pre_attn_scalar (> 0), attn_logit_softcapping (> 0 or null),
                    partial_rotary_factor in (0, 1]; attention_bias true only where the family's module has biases
                    (Llama's, Mistral's and Phi-3's layers here carry none)
    the rest        every other field transformers' config classes read (their strict dataclasses raise deep inside
                    a run): rms_norm_eps a positive float, bools as JSON booleans, ...; what building a layer costs
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from harness.common import UserError
from harness.reference.family import FAMILIES, FULL, SLIDING

ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("short_factor", "long_factor"),  # lists, checked in check_rope
}
LISTS = ("short_factor", "long_factor")
OPTIONAL_NUMBERS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                    "partial_rotary_factor")  # fmt: skip
MAX_HEADS = 1 << 14
MAX_SIZE = 1 << 20  # hidden_size, head_dim: far above any real model, far below an allocation that cannot succeed


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def positive_int(d: dict, key: str, where: str, fix: str, *, required: bool = True, limit: int = MAX_SIZE):
    v = d.get(key)
    if v is None and not required:
        return None
    if not is_int(v) or v <= 0:
        raise UserError(f"{where}: '{key}' must be a positive integer, got {v!r}; {fix}")
    if v > limit:
        raise UserError(f"{where}: '{key}' = {v} is larger than any model this harness can hold (at most {limit}); "
                        f"{fix}")  # fmt: skip
    return v


def positive_number(d: dict, key: str, where: str, fix: str, *, required: bool = True):
    v = d.get(key)
    if v is None and not required:
        return None
    if not is_number(v) or v <= 0:
        raise UserError(f"{where}: '{key}' must be a positive finite number, got {v!r}; {fix}")
    return v


def check_config(config, where: str, fix: str = "fix the config or re-extract the fixture") -> None:
    """The facts every implementation and reference relies on, in transformers 5 form (rope_parameters)."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(config).__name__}; {fix}")
    check_fields(config, where, fix)
    D = positive_int(config, "hidden_size", where, fix)
    H = positive_int(config, "num_attention_heads", where, fix, limit=MAX_HEADS)
    Hkv = positive_int(config, "num_key_value_heads", where, fix, limit=MAX_HEADS)
    d = positive_int(config, "head_dim", where, fix, required=False)
    if d is None:
        if D % H:
            raise UserError(f"{where}: no head_dim, and hidden_size={D} is not a multiple of num_attention_heads={H}; "
                            f"give head_dim; {fix}")  # fmt: skip
        d = D // H
    if H % Hkv:
        raise UserError(f"{where}: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv} (each KV "
                        f"head must serve a whole group of query heads); {fix}")  # fmt: skip
    if d % 2:
        raise UserError(f"{where}: head_dim={d} must be even for RoPE (pairs of channels rotate); {fix}")
    # absent: transformers' default; present, even as null, an integer (LlamaConfig types them `int`)
    positive_int(config, "max_position_embeddings", where, fix, required="max_position_embeddings" in config,
                 limit=1 << 30)  # fmt: skip
    positive_int(config, "num_hidden_layers", where, fix, required="num_hidden_layers" in config, limit=1 << 16)
    positive_int(config, "vocab_size", where, fix, required="vocab_size" in config, limit=1 << 24)
    positive_int(config, "intermediate_size", where, fix, required="intermediate_size" in config)
    rp = config.get("rope_parameters")
    if not isinstance(rp, dict):
        raise UserError(f"{where}: no 'rope_parameters' object with rope_type and rope_theta (transformers 5 form); "
                        "load it through transformers' config class or re-extract the fixture")  # fmt: skip
    check_family(config, where, fix)
    for label, one in per_layer_type(rp):
        check_rope(one, config, f"{where}: rope_parameters{label}", fix)
        rd = int(d * one.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        if rd < 2 or rd % 2:
            raise UserError(f"{where}: head_dim={d} with partial_rotary_factor gives a rotary dimension of {rd}; it "
                            f"must be even and at least 2 (pairs of channels rotate); {fix}")  # fmt: skip
        for key in LISTS:
            if key in one and len(one[key]) != rd // 2:
                raise UserError(f"{where}: rope_parameters{label}: '{key}' has {len(one[key])} entries, the rotary "
                                f"dimension {rd} needs {rd // 2} (one per pair of channels); {fix}")  # fmt: skip


def per_layer_type(rp: dict) -> list[tuple[str, dict]]:
    """[(label, flat rope parameters)]: one entry, or one per layer type (Gemma 3 keys them by layer type)."""
    if FULL in rp or SLIDING in rp:
        bad = [k for k in rp if k not in (FULL, SLIDING) or not isinstance(rp[k], dict)]
        if bad:
            return [(f"['{bad[0]}']", {"rope_type": None})]  # refused by check_rope, naming the entry
        return [(f"['{k}']", v) for k, v in rp.items()]
    return [("", rp)]


def _window(v) -> bool:
    return v is None or (is_int(v) and v > 0)


def _cap(v) -> bool:
    return v is None or (is_number(v) and v > 0)


FAMILY_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "sliding_window": (_window, "a positive integer (the keys a sliding layer sees) or null"),
    "query_pre_attn_scalar": (lambda v: is_number(v) and v > 0, "a positive number (scores are scaled by its -1/2 "
                              "power)"),
    "attn_logit_softcapping": (_cap, "a positive number or null (no cap)"),
    "partial_rotary_factor": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}  # fmt: skip
NO_BIAS = ("llama", "mistral", "phi3")  # families whose attention here has no bias tensors


def check_family(config: dict, where: str, fix: str) -> None:
    """model_type one the harness verifies, and the attention fields of its family."""
    mt = config.get("model_type") or "llama"
    if mt not in FAMILIES:
        raise UserError(f"{where}: model_type {mt!r} is not a family this harness verifies ({', '.join(FAMILIES)}); "
                        f"{fix}")  # fmt: skip
    for key, (ok, what) in FAMILY_FIELDS.items():
        if key in config and not ok(config[key]):
            raise UserError(f"{where}: '{key}' must be {what}, got {config[key]!r}; {fix}")
    types = config.get("layer_types")
    if types is not None:
        n = config.get("num_hidden_layers")
        if not isinstance(types, list) or any(t not in (FULL, SLIDING) for t in types) or (is_int(n) and len(types)
                                                                                             != n):  # fmt: skip
            raise UserError(f"{where}: 'layer_types' must list '{FULL}' or '{SLIDING}' for each of the "
                            f"num_hidden_layers={n} layers, got {str(types)[:120]}; {fix}")  # fmt: skip


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
BOOLS = ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_cache", "output_hidden_states", "return_dict",
         "is_encoder_decoder", "use_sliding_window")  # fmt: skip
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _positive_float(v) -> bool:  # LlamaConfig types these `float`: an integer such as 1 is refused there too
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _float_dtype(v) -> bool:
    return v is None or (isinstance(v, str) and v.removeprefix("torch.") in FLOAT_DTYPES)


def _token_ids(v) -> bool:
    return v is None or is_int(v) or (isinstance(v, list) and all(map(is_int, v)))


def _optional(kind: type):
    return lambda v: v is None or isinstance(v, kind)


# The rest of transformers' LlamaConfig, each field with the type (and range) its strict dataclass wants: a wrong one
# is a traceback inside LlamaConfig(...) halfway through a run, or silently another model. Absent: its default.
FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "rms_norm_eps": (_positive_float, "a positive finite float (e.g. 1e-05)"),
    "initializer_range": (lambda v: v == 0.0 or _positive_float(v), "a finite float >= 0 (e.g. 0.02)"),
    "attention_dropout": (lambda v: v is None or (is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "hidden_act": (lambda v: isinstance(v, str) and v != "", 'an activation name (e.g. "silu")'),
    "pretraining_tp": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer"),
    "chunk_size_feed_forward": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "pad_token_id": (lambda v: v is None or is_int(v), "an integer or null"),
    "bos_token_id": (lambda v: v is None or is_int(v), "an integer or null"),
    "eos_token_id": (_token_ids, "an integer, a list of integers or null"),
    "dtype": (_float_dtype, f"null or one of {', '.join(FLOAT_DTYPES)}"),
    "torch_dtype": (_float_dtype, f"null or one of {', '.join(FLOAT_DTYPES)}"),
    "architectures": (lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
                      "a list of class names or null"),
    "transformers_version": (_optional(str), "a version string or null"),
    "model_type": (lambda v: isinstance(v, str), 'a string ("llama", "qwen3", ...)'),
    "id2label": (_optional(dict), "an object or null"),
    "label2id": (_optional(dict), "an object or null"),
    "problem_type": (lambda v: v in PROBLEM_TYPES, "null or a transformers problem type"),
    **{key: (lambda v: isinstance(v, bool), "true or false (a JSON boolean, not a string or number)") for key in BOOLS},
}  # fmt: skip


def check_fields(config: dict, where: str, fix: str) -> None:
    """Every field in FIELDS that the config carries, with its type and range; attention_bias must be false."""
    for key, (ok, what) in FIELDS.items():
        if key in config and not ok(config[key]):
            raise UserError(f"{where}: '{key}' must be {what}, got {config[key]!r}; {fix}")
    if config.get("attention_bias") is True and (config.get("model_type") or "llama") in NO_BIAS:
        raise UserError(f"{where}: 'attention_bias' is true, but a {config.get('model_type') or 'llama'} fixture "
                        "carries no bias tensors (q/k/v/o_proj weights only), so this layer cannot be verified; use a "
                        "checkpoint without attention biases (families with biases: qwen2, qwen3, gemma2, "
                        "gemma3_text, gpt_oss)")  # fmt: skip


REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
INT_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers", "vocab_size",
            "max_position_embeddings", "intermediate_size")  # fmt: skip


def check_raw(raw, where: str, fix: str = "fix the config") -> None:
    """A source's config before transformers reads it (it accepts strings and floats where integers belong)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(raw).__name__}; {fix}")
    check_fields(raw, where, fix)
    for key in INT_KEYS:
        # the shape of the model is never a default: transformers would fill in 4096 and 32 heads silently
        if raw.get(key) is not None or key in REQUIRED_KEYS:
            positive_int(raw, key, where, fix, limit=1 << 30)
    if raw.get("rope_theta") is not None:
        positive_number(raw, "rope_theta", where, fix)
    for key in ("rope_scaling", "rope_parameters"):
        v = raw.get(key)
        if v is not None and not isinstance(v, dict):
            raise UserError(f"{where}: '{key}' must be an object or null, got {type(v).__name__}; {fix}")
        if isinstance(v, dict):
            kind = v.get("rope_type", v.get("type", "default"))
            if not isinstance(kind, str) or kind not in ROPE_FIELDS:
                raise UserError(f"{where}: {key}: rope_type {kind!r} is not one the harness computes "
                                f"({', '.join(ROPE_FIELDS)}); {fix}")  # fmt: skip
            for field in ROPE_FIELDS[kind]:
                if field not in LISTS and (field in v or field != "original_max_position_embeddings"):
                    positive_number(v, field, f"{where}: {key}", fix)
            _truncate(v, f"{where}: {key}", fix)


def _truncate(rp: dict, where: str, fix: str) -> None:
    if "truncate" in rp and not isinstance(rp["truncate"], bool):
        raise UserError(f"{where}: 'truncate' must be true or false (a JSON boolean), got {rp['truncate']!r}; {fix}")


def check_rope(rp: dict, config: dict, where: str, fix: str) -> None:
    kind = rp.get("rope_type", "default")
    if not isinstance(kind, str) or kind not in ROPE_FIELDS:
        raise UserError(f"{where}: rope_type {kind!r} is not one the harness computes ({', '.join(ROPE_FIELDS)}); "
                        f"{fix}")  # fmt: skip
    positive_number(rp, "rope_theta", where, fix)
    for key in ROPE_FIELDS[kind]:
        if key in LISTS:
            v = rp.get(key)
            if not isinstance(v, list) or not v or not all(is_number(x) and x > 0 for x in v):
                raise UserError(f"{where}: '{key}' must be a list of positive numbers, got {str(v)[:80]}; {fix}")
            continue
        positive_number(rp, key, where, fix)
    if kind == "longrope" and not is_int(rp.get("original_max_position_embeddings",
                                                config.get("original_max_position_embeddings"))):  # fmt: skip
        raise UserError(f"{where}: longrope needs original_max_position_embeddings (a positive integer); {fix}")
    for key in OPTIONAL_NUMBERS:
        if key in rp and rp[key] is not None and not (is_number(rp[key]) and rp[key] > 0):
            raise UserError(f"{where}: '{key}' must be a positive finite number, got {rp[key]!r}; {fix}")
    if "original_max_position_embeddings" in rp and not is_int(rp["original_max_position_embeddings"]):
        v = rp["original_max_position_embeddings"]
        raise UserError(f"{where}: 'original_max_position_embeddings' must be a positive integer, got {v!r}; {fix}")
    if kind == "llama3" and not rp["high_freq_factor"] > rp["low_freq_factor"]:
        raise UserError(f"{where}: llama3 needs high_freq_factor > low_freq_factor, got {rp['high_freq_factor']} and "
                        f"{rp['low_freq_factor']}; {fix}")  # fmt: skip
    if kind == "dynamic" and not is_int(config.get("max_position_embeddings")):
        raise UserError(f"{where}: dynamic scaling needs max_position_embeddings in the config; {fix}")
    _truncate(rp, where, fix)
    prf = rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if not (is_number(prf) and 0 < prf <= 1):
        raise UserError(f"{where}: 'partial_rotary_factor' must be in (0, 1], got {prf!r}; {fix}")


def layer_bytes(config: dict, itemsize: int = 4) -> int:
    """The bytes of one decoder layer's weights (attention and MLP) at this itemsize: what building one costs."""
    D, H, Hkv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or D // H
    inter = config.get("intermediate_size") or 4 * D
    return itemsize * (2 * H * d * D + 2 * Hkv * d * D + 3 * inter * D)


def check_fits(nbytes: int, what: str, where: str, fraction: float = 0.5) -> None:
    """Refuse before allocating what cannot fit in this machine's free memory."""
    free = _available()
    if free and nbytes > fraction * free:
        raise UserError(f"{where}: {what} needs {nbytes / 2**30:.1f} GiB, more than this machine can spare "
                        f"({free / 2**30:.1f} GiB available); use a smaller config or a bigger machine")  # fmt: skip


def _available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
