"""Token-by-token decoding with a KV cache.

Prefill runs the prompt once and keeps every layer's rotated keys and values; each decoding step projects only
the new token(s), appends their k and v to the cache, and attends from the new queries to all cached keys
(bottom-right causal: the new tokens are the last ones). Positions continue from the prompt, so RoPE rotates the
new k exactly as a full pass would. Prefill-then-decode therefore equals one full pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from impl import context_of
from impl.layer import keywords
from impl.projection import output, project_qkv


@dataclass
class KVCache:
    """Per layer: keys and values (B, Hkv, T, d), keys already rotated."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.k:
            k = torch.cat((self.k[layer], k), dim=2)  # (B, Hkv, T + S, d)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def length(self, layer: int = 0) -> int:
        return self.k[layer].shape[2] if layer in self.k else 0


def step(core, x, weights, *, config, position_ids, cache: KVCache, layer: int = 0, attention_mask=None):
    """Attention for new tokens x (B, S_new, D) given the cache; appends to it. Returns (B, S_new, D).

    core: a kernel of the core contract (impl.CORES, impl/__init__.py); attention_mask [B, T + S_new] covers the
    cached tokens and the new ones (1 = token, 0 = padding). Causal is bottom-right: the new tokens are the last, so
    a sliding layer's window (W - 1, 0) counts back from each new token over the cache. The family's pieces (biases,
    q/k norms, scale, softcap, sinks) as in the full pass (impl/layer.py).
    """
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S_new, d), (B, Hkv, S_new, d) x2
    k, v = cache.append(layer, k, v)  # (B, Hkv, T + S_new, d)
    ctx = core(q, k, v, causal=True, attention_mask=attention_mask, **keywords(config, weights))
    return output(context_of(ctx), weights)  # (B, S_new, D)
