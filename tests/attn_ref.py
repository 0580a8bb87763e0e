"""What the kernel tests (test_tiled, test_tiled_backward, test_triton) share: seeded q/k/v, an attention computed in
float64 written independently of impl/ (masks from aranges, GQA by repeat_interleave), the full-tensor error, and
a record of the largest errors each module measured (printed with -s)."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# a small Llama-shaped config (GQA 4/2, head_dim 32) for layer-level checks
SMALL = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "num_hidden_layers": 1,
    "vocab_size": 100,
    "intermediate_size": 64,
    "model_type": "llama",
}


class Worst:
    """The largest error per comparison, printed when the module ends."""

    def __init__(self, module: str):
        self.module, self.errors = module, {}

    def note(self, key: str, err: float) -> float:
        self.errors[key] = max(self.errors.get(key, 0.0), float(err))
        return float(err)

    def single_threaded(self):
        """A module fixture's body: one intra-op thread while the module runs (thousands of tiny tile ops: with 2
        threads on a 2-core machine, OpenMP barriers make each op milliseconds), then the summary."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        print(f"\n[{self.module}] largest errors measured:")
        for k in sorted(self.errors):
            print(f"  {k:50s} {self.errors[k]:.3e}")


def maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs of the full difference (float64); NaN anywhere -> inf."""
    d = (a.double() - b.double()).abs()
    return float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0


def qkv(B, H, Hkv, Sq, Sk, d, seed=0, scale=1.0, dtype=torch.float32):
    """q (B, H, Sq, d), k and v (B, Hkv, Sk, d); q and k times `scale` (the scores' spread), v ~ 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, d, generator=g) * scale
    k = torch.randn(B, Hkv, Sk, d, generator=g) * scale
    v = torch.randn(B, Hkv, Sk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def allowed_mask(Sq, Sk, attention_mask=None, causal=True):
    """(B|1, 1, Sq, Sk) bool: causal bottom-right aligned (query i sees keys up to Sk - Sq + i), padding keys off."""
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        keep = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    keep = keep[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    return keep


def left_padding_mask(Sk, pads):
    """[B, Sk]: row b has pads[b] leading zeros."""
    m = torch.ones(len(pads), Sk, dtype=torch.long)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


def exact(q, k, v, attention_mask=None, causal=True):
    """Attention in float64: (out (B, H, Sq, d), lse (B, H, Sq)); zeros and -inf for rows that see no key."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, Sk, d)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Sq, Sk)
    keep = allowed_mask(q.shape[2], k.shape[2], attention_mask, causal)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(keep, torch.exp(s - lse[..., None]), torch.zeros((), dtype=torch.float64))
    return p @ v, lse


def quadratic(seen, S):
    """Recorded tensors that are S x S or larger: >= S*S elements, or two dims of size >= S."""
    return [(f, s) for f, s in seen if math.prod(s) >= S * S or sum(n >= S for n in s) >= 2]


class TensorRecorder(TorchDispatchMode):
    """Every tensor returned by any aten op while active: (op, shape)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def rec(t):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
            return t

        tree_map(rec, out)
        return out
