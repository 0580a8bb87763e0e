"""Synthetic weights for a config: deterministic, seeded, with the statistics of a trained layer.

Used where real weights cannot be had (Llama-3.2-1B is gated): the fixture keeps the exact config, so every
shape, head ratio and RoPE frequency is the real model's, and is labelled `synthetic: true`.
- q/k: entries ~ N(0, (1.5/sqrt(hidden))^2), so q and k entries have std ~1.5 and scores q.k/sqrt(d)
  std ~2: softmax rows neither uniform nor one-hot, as in a trained layer;
- v/o: ~ N(0, 1/fan_in); norms ~ 1 + 0.1 N(0,1);
- a few outlier input channels: input_layernorm weights ~20x on 4 channels (trained Llamas show such
  "massive activation" channels), which stresses accumulation order in the projections.
Every tensor is a pure function of (seed, name), so any layer can be drawn without drawing the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from harness.errors import UserError
from harness.sources.base import Checkpoint, normalize_config
from harness.sources.local import read_config

OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 20.0


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class SyntheticCheckpoint(Checkpoint):
    def __init__(self, config_path: Path, *, seed: int = 0):
        raw = read_config(config_path)
        config = normalize_config(raw, str(config_path))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        self.dtype = getattr(torch, str(dtype_name).removeprefix("torch."), None)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise UserError(f"{config_path}: dtype '{dtype_name}' is not a floating-point torch dtype; fix the config")
        self.seed = seed
        name = f"{Path(config_path).resolve().parent.name}-synthetic"
        prov = {"config_from": str(config_path), "seed": seed}
        super().__init__(kind="synthetic", name=name, config=config, provenance=prov, synthetic=True)

    def _shape_and_std(self, name: str) -> tuple[tuple[int, ...], float]:
        c = self.config
        D, H, Hkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        I, V = c.get("intermediate_size", 4 * D), c["vocab_size"]
        leaf = ".".join(name.split(".")[-3:]) if ".layers." in name else name
        table = {
            "self_attn.q_proj.weight": ((H * d, D), 1.5 / D**0.5),
            "self_attn.k_proj.weight": ((Hkv * d, D), 1.5 / D**0.5),
            "self_attn.v_proj.weight": ((Hkv * d, D), 1 / D**0.5),
            "self_attn.o_proj.weight": ((D, H * d), 1 / (H * d) ** 0.5),
            "mlp.gate_proj.weight": ((I, D), 1 / D**0.5),
            "mlp.up_proj.weight": ((I, D), 1 / D**0.5),
            "mlp.down_proj.weight": ((D, I), 1 / I**0.5),
            "model.embed_tokens.weight": ((V, D), 1.0),
            "lm_head.weight": ((V, D), 1 / D**0.5),
        }
        if leaf in table:
            return table[leaf]
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return (D,), 0.1
        raise self.missing(name)

    def tensor(self, name: str) -> torch.Tensor:
        shape, std = self._shape_and_std(name)
        g = _generator(self.seed, name)
        if len(shape) == 1:  # a norm weight: 1 + noise, with a few outlier channels on input_layernorm
            w = 1 + std * torch.randn(shape, generator=g)
            if name.endswith("input_layernorm.weight"):
                idx = torch.randperm(shape[0], generator=g)[:OUTLIER_CHANNELS]
                w[idx] *= OUTLIER_GAIN
        else:
            w = std * torch.randn(shape, generator=g)
        return w.to(self.dtype)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        if name != "model.embed_tokens.weight":
            return super().rows(name, ids)
        D = self.config["hidden_size"]
        out = [torch.randn(D, generator=_generator(self.seed, f"{name}[{int(i)}]")) for i in ids.reshape(-1)]
        return torch.stack(out).reshape(*ids.shape, D).to(self.dtype)  # (…, hidden)

    def tokenize(self, text: str) -> torch.Tensor:
        # Synthetic byte-level "tokens": one id per UTF-8 byte, so the prompt still sets the length.
        V = self.config["vocab_size"]
        return torch.tensor([[b % V for b in text.encode()]], dtype=torch.int64)  # (1, S)
