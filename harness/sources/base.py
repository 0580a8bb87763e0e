"""What every source provides: a config in transformers 5 form and tensors under HF's names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.errors import UserError

# Keys every fixture config carries explicitly, whatever transformers considers a default.
EXPLICIT_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
)


def normalize_config(raw: dict, where: str = "config.json") -> dict:
    """An HF config dict (transformers 4 or 5 form) -> transformers 5 form with rope_parameters.

    transformers' LlamaConfig does the conversion (rope_scaling + rope_theta -> rope_parameters) and
    validation; we keep its diff-dict (no defaults noise), the keys above explicitly, and no
    transformers_version (it belongs in the manifest, and would make identical fixtures differ).
    """
    from transformers import LlamaConfig

    if raw.get("model_type", "llama") not in ("llama", "mistral"):
        raise UserError(
            f"{where}: model_type '{raw.get('model_type')}' is not a Llama-architecture model; "
            "this harness verifies Llama attention (pass a Llama-family checkpoint)"
        )
    if raw.get("attention_bias"):
        raise UserError(f"{where}: attention_bias is true; Llama attention has no bias (pass a Llama checkpoint)")
    try:
        cfg = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{where}: transformers rejects this config ({str(e).splitlines()[0]}); fix it") from None
    out = cfg.to_diff_dict()
    out.pop("transformers_version", None)
    for k in EXPLICIT_KEYS:
        out[k] = getattr(cfg, k)
    out["model_type"] = "llama"
    return out


@dataclass
class Checkpoint:
    """A checkpoint opened for reading one layer. Subclasses implement `tensor` (and may speed up `rows`)."""

    kind: str  # hf-hub | hf-local | meta | gguf | synthetic
    name: str  # default fixture name
    config: dict  # transformers 5 form
    provenance: dict = field(default_factory=dict)  # repo_id, revision, commit_sha, path, files_read, ...
    synthetic: bool = False
    bytes_downloaded: int = 0

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor under its HF name (e.g. model.layers.0.self_attn.q_proj.weight), in the source dtype."""
        raise NotImplementedError

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (embedding lookup); sources that can read only those rows override it."""
        return self.tensor(name)[ids]

    def tokenize(self, text: str) -> torch.Tensor | None:
        """Token ids [1, S] for the prompt, or None when the source carries no tokenizer."""
        return None

    def close(self) -> None:
        pass

    def missing(self, name: str, hint: str = "") -> UserError:
        where = self.provenance.get("path") or self.provenance.get("repo_id") or self.name
        return UserError(f"{where}: no tensor '{name}' in the checkpoint{hint}; is it a complete Llama checkpoint?")


def interleaved_to_half_split(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from the interleaved RoPE order (Meta's checkpoints, llama.cpp) to HF's half-split order.

    Per head, row pairs (2i, 2i+1) rotate together in the interleaved form; HF rotates (i, i + d/2).
    This is the `permute` of transformers' convert_llama_weights_to_hf.py.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H*d, in)


def hf_tokenizer(path) -> object | None:
    """transformers' tokenizer from a directory holding tokenizer files, or None."""
    from pathlib import Path

    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"]
    return torch.tensor([ids], dtype=torch.int64)  # (1, S)
