"""The reference: transformers' own LlamaAttention and LlamaRotaryEmbedding, built from a config and weights.

Masks are always explicit 4-D additive masks (0 keep, finfo.min drop): transformers' eager attention with
attention_mask=None is NOT causal. The causal part is bottom-right aligned (queries are the last Sq of Sk keys),
padding follows the tokenizer's convention (attention_mask [B, Sk], 1 = token, 0 = padding).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from impl.rope import cos_sin, inv_freq


def hf_config(config: dict, attn_implementation: str = "eager"):
    cfg = LlamaConfig.from_dict(config)
    cfg._attn_implementation = attn_implementation
    return cfg


def additive_mask(Sq: int, Sk: int, attention_mask: torch.Tensor | None = None, B: int = 1, dtype=torch.float32):
    """[B, 1, Sq, Sk] additive mask: causal (bottom-right) plus padding, in HF's convention."""
    i = torch.arange(Sq)[:, None] + (Sk - Sq)  # (Sq, 1)
    keep = (torch.arange(Sk)[None, :] <= i)[None, None]  # (1, 1, Sq, Sk)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, Sq, Sk)
    keep = keep.expand(max(B, keep.shape[0]), 1, Sq, Sk)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class Reference:
    """HF's self_attn for one layer: call it like the plug-in contract (x, position_ids, attention_mask)."""

    def __init__(
        self,
        config: dict,
        weights: dict[str, torch.Tensor],
        *,
        layer: int = 0,
        dtype=torch.float32,
        attn_implementation: str = "eager",
    ):
        self.cfg = hf_config(config, attn_implementation)
        self.dtype = dtype
        with torch.device("meta"):  # no random initialisation: the fixture's weights are assigned below
            self.attn = LlamaAttention(self.cfg, layer).to(dtype).eval()
        state = {f"{n}.weight": w.to(dtype, copy=True) for n, w in weights.items() if n.endswith("_proj")}
        self.attn.load_state_dict(state, assign=True)
        self.rope = LlamaRotaryEmbedding(self.cfg)

    @torch.no_grad()
    def __call__(self, x, position_ids, attention_mask=None, past_key_values=None):
        x = x.to(self.dtype)
        B, S, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask = additive_mask(S, past + S, None if attention_mask is None else attention_mask.cpu(), B,
                             self.dtype).to(x.device)  # fmt: skip
        cos_sin = self.rope.to(x.device)(x, position_ids)
        out, _ = self.attn(x, position_embeddings=cos_sin, attention_mask=mask, past_key_values=past_key_values)
        return out


def float64_tables(config: dict, position_ids: torch.Tensor):
    """cos, sin in float64 from float64 frequencies: the exact math of the config, for the float64 reference.

    transformers' rope init functions only produce float32; impl.rope reproduces them bit for bit in float32
    (tested) and evaluates the same formulas in float64 here.
    """
    inv, scaling = inv_freq(config, seq_len=int(position_ids.max()) + 1, dtype=torch.float64)
    return cos_sin(inv.to(position_ids.device), position_ids, scaling, dtype=torch.float64)


class Reference64(Reference):
    """HF's LlamaAttention in float64 with float64 RoPE tables: the yardstick for HF and the implementation.

    Through transformers' sdpa attention function, not eager: eager computes its softmax in float32 whatever the
    input dtype (a 1e-7 error in a "float64" reference), while SDPA's math kernel stays in float64.
    """

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], *, layer: int = 0):
        super().__init__(config, weights, layer=layer, dtype=torch.float64, attn_implementation="sdpa")
        self.config = config

    @torch.no_grad()
    def __call__(self, x, position_ids, attention_mask=None, past_key_values=None):
        x = x.to(torch.float64)
        B, S, _ = x.shape
        mask = additive_mask(S, S, None if attention_mask is None else attention_mask.cpu(), B, torch.float64)
        out, _ = self.attn(x, position_embeddings=float64_tables(self.config, position_ids),
                           attention_mask=mask.to(x.device))  # fmt: skip
        return out
