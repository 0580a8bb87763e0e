"""The config transformers makes of Gemma 3 270M's GGUF, checked before the dequantized model is cached.

transformers maps the GGUF metadata (gemma3.*) to a Gemma3TextConfig. The metadata holds the sizes, the sliding
window and one RoPE base (the global layers'); it lacks the local layers' RoPE base, query_pre_attn_scalar and the
layer pattern, which transformers fills with Gemma3TextConfig's defaults. Both halves are checked: the first
against the file, the second against Gemma 3 270M's own config.json (google/gemma-3-270m), so a transformers whose
GGUF mapping or defaults changed is refused in one line instead of silently giving another model.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from harness.common import UserError
from harness.reference.family import FULL, SLIDING

# google/gemma-3-270m's config.json, for what the GGUF metadata lacks
GEMMA3_270M = {"query_pre_attn_scalar": 256, "sliding_rope_theta": 10000.0, "pattern": 6}


# GGUF value types (gguf's GGUFValueType): struct formats of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def gguf_metadata(path: Path, prefix: str) -> dict:
    """The GGUF's scalar metadata fields under prefix (e.g. "gemma3."), names without it. The header alone, read
    here: the gguf library's reader parses every tensor and the 262k-token vocabulary first (seconds)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        _, _, n_kv = struct.unpack_from("<IQQ", m, 4)  # after the magic: version, tensor count, key count

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", m, at)
            return m[at + 8 : at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def skip(kind: int, at: int) -> tuple[object, int]:
            """(the value, where the next field starts); arrays are skipped (value None)."""
            if kind in SCALARS:
                return struct.unpack_from("<" + SCALARS[kind], m, at)[0], at + struct.calcsize(SCALARS[kind])
            if kind == STRING:
                return string(at)
            elem, count = struct.unpack_from("<IQ", m, at)
            at += 12
            if elem in SCALARS:
                return None, at + count * struct.calcsize(SCALARS[elem])
            for _ in range(count):
                at = skip(elem, at)[1]
            return None, at

        out, at = {}, 24
        for _ in range(n_kv):
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", m, at)
            value, at = skip(kind, at + 4)
            if key.startswith(prefix) and value is not None:
                out[key.removeprefix(prefix)] = value
        return out


def gemma3_expected(meta: dict) -> dict:
    """What Gemma 3 270M's config must say: from the GGUF's metadata, and (where it is silent) its config.json."""
    n = int(meta["block_count"])
    pattern = GEMMA3_270M["pattern"]  # five sliding layers, then a global one
    return {
        "num_hidden_layers": n,
        "hidden_size": int(meta["embedding_length"]),
        "num_attention_heads": int(meta["attention.head_count"]),
        "num_key_value_heads": int(meta["attention.head_count_kv"]),
        "head_dim": int(meta["attention.key_length"]),
        "sliding_window": int(meta["attention.sliding_window"]),
        "rms_norm_eps": float(meta["attention.layer_norm_rms_epsilon"]),
        "global rope_theta": float(meta["rope.freq_base"]),
        "local rope_theta": GEMMA3_270M["sliding_rope_theta"],
        "query_pre_attn_scalar": GEMMA3_270M["query_pre_attn_scalar"],
        "layer_types": [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)],
    }


def gemma3_got(cfg: dict) -> dict:
    """The same fields of a transformers config (its to_dict(), transformers 5 form)."""
    rope = cfg.get("rope_parameters") or {}
    return {
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "num_attention_heads": cfg.get("num_attention_heads"),
        "num_key_value_heads": cfg.get("num_key_value_heads"),
        "head_dim": cfg.get("head_dim"),
        "sliding_window": cfg.get("sliding_window"),
        "rms_norm_eps": cfg.get("rms_norm_eps"),
        "global rope_theta": (rope.get(FULL) or {}).get("rope_theta"),
        "local rope_theta": (rope.get(SLIDING) or {}).get("rope_theta"),
        "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar"),
        "layer_types": cfg.get("layer_types"),
    }


def mismatches(got: dict, want: dict) -> list[str]:
    def same(a, b) -> bool:
        if isinstance(b, float):  # the GGUF stores eps as float32
            return isinstance(a, int | float) and math.isclose(a, b, rel_tol=1e-6)
        return a == b

    return [f"{k} {got[k]!r} (want {v!r})" for k, v in want.items() if not same(got[k], v)]


def check_gemma3(cfg: dict, path: Path) -> None:
    """UserError (one line) unless cfg is Gemma 3 270M's config as the GGUF at path and its config.json say."""
    import transformers  # lazy: slow to import (only its version is read)

    bad = mismatches(gemma3_got(cfg), gemma3_expected(gguf_metadata(path, "gemma3.")))
    if bad:
        raise UserError(f"{path.name}: transformers {transformers.__version__} read a config that is not Gemma 3 "
                        f"270M's: {'; '.join(bad)}; use the transformers version in harness/constraints.txt "
                        "(make setup)")  # fmt: skip
