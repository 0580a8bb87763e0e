"""The reference: the family's own transformers attention module (LlamaAttention, Qwen2Attention, Qwen3Attention,
MistralAttention, Gemma2Attention, Gemma3Attention, GptOssAttention, Phi3Attention) built from the fixture's config,
its weights loaded (biases, q/k norms, sinks; Phi-3's q/k/v fused back into qkv_proj), its own rotary embedding
(per layer type for Gemma 3) and the mask the family's Model builds for the layer's type (masks.py).

    Reference     eager (or sdpa) in the dtype, as transformers runs it
    Reference64   float64 with float64 rotary tables; sdpa's math kernel where the family's attention is plain,
                  eager where transformers' sdpa path cannot compute it (softcap, sinks), with the float32 steps of
                  eager and of the q/k norms kept in float64 (float64.py)
"""

from __future__ import annotations

import contextlib

import torch

from harness.reference.family import family, hf_config, state_dict, window
from harness.reference.float64 import RMSNorm64, float64_softmax
from harness.reference.masks import additive_mask
from harness.reference.rope import float64_tables, rotary


def softcap(config: dict) -> float:
    return float(config.get("attn_logit_softcapping") or 0.0)


def has_sdpa_path(config: dict) -> bool:
    """transformers' sdpa attention computes plain (masked) attention only: no softcap, no sinks."""
    return not softcap(config) and not family(config).sinks


class Reference:
    """The family's self_attn for one layer: call it like the plug-in contract (x, position_ids, attention_mask).
    layer None: the config's layer_idx (a contract config), else 0."""

    def __init__(
        self,
        config: dict,
        weights: dict[str, torch.Tensor],
        *,
        layer: int | None = None,
        dtype=torch.float32,
        attn_implementation: str = "eager",
    ):
        self.layer = int(config.get("layer_idx", 0)) if layer is None else layer
        self.config, self.dtype = config, dtype
        self.family = family(config)
        self.cfg = hf_config(config, attn_implementation)
        self.window = window(config, self.layer)
        with torch.device("meta"):  # no random initialisation: the fixture's weights are assigned below
            self.attn = self.family.cls("Attention")(self.cfg, self.layer).to(dtype).eval()
        state = {k: w.to(dtype, copy=True) for k, w in state_dict(config, weights).items()}
        self.attn.load_state_dict(state, assign=True)
        self.rope = rotary(config, self.layer, self.cfg)

    def mask(self, S: int, Sk: int, attention_mask, B: int, dtype) -> torch.Tensor:
        am = None if attention_mask is None else attention_mask.cpu()
        return additive_mask(S, Sk, am, B, dtype, window=self.window)

    def forward(self, x, position_ids, attention_mask=None, past_key_values=None):
        """The module's output, differentiable (gradients: verify/grads.py)."""
        x = x.to(self.dtype)
        B, S, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask = self.mask(S, past + S, attention_mask, B, self.dtype).to(x.device)
        cos_sin = self.rope(x, position_ids)
        out, _ = self.attn(x, position_embeddings=cos_sin, attention_mask=mask, past_key_values=past_key_values)
        return out

    @torch.no_grad()
    def __call__(self, x, position_ids, attention_mask=None, past_key_values=None):
        return self.forward(x, position_ids, attention_mask, past_key_values)


class Reference64(Reference):
    """The family's module in float64 with float64 RoPE tables: the yardstick for transformers and the
    implementation. Plain attention runs through transformers' sdpa function (eager softmaxes in float32 whatever
    the input); softcap and sinks through eager, its float32 softmax kept in float64; q/k norms as RMSNorm64."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], *, layer: int | None = None):
        path = "sdpa" if has_sdpa_path(config) else "eager"
        super().__init__(config, weights, layer=layer, dtype=torch.float64, attn_implementation=path)
        if self.family.qk_norm:
            for name in ("q_norm", "k_norm"):
                norm = getattr(self.attn, name)
                eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
                setattr(self.attn, name, RMSNorm64(norm.weight, eps, self.family.norm_plus_one))

    def forward(self, x, position_ids, attention_mask=None, past_key_values=None):
        x = x.to(torch.float64)
        B, S, _ = x.shape
        mask = self.mask(S, S, attention_mask, B, torch.float64).to(x.device)
        tables = float64_tables(self.config, position_ids, self.layer)
        with float64_softmax(self.family.module()) if softcap(self.config) else contextlib.nullcontext():
            out, _ = self.attn(x, position_embeddings=tables, attention_mask=mask)
        return out
