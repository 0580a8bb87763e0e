"""The calls measured: one per implementation on the same q, k, v (projected and rotated once, outside the
timing): naive, loop, tiled, sdpa (ours) and transformers' eager and sdpa attention functions (anchors); plus the
whole layer (projections included) for tiled and for transformers' LlamaAttention. Their useful FLOPs, and the
FlashAttention paper's IO model to draw beside the measured traffic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.common import FIXTURES_DIR, UserError

CONFIG = FIXTURES_DIR / "llama-3.2-1b" / "config.json"
CORE = ("naive", "loop", "tiled", "sdpa", "hf_eager", "hf_sdpa")
LAYER = ("layer_tiled", "layer_hf")
H100_SMEM = 227 * 1024  # bytes of shared memory one thread block may use on an H100 SM: the tile budget M

# ---------------------------------------------------------------------------------------------------------
# shapes and FLOPs


@dataclass(frozen=True)
class Shape:
    H: int  # query heads
    Hkv: int  # key/value heads
    d: int  # head dim
    D: int  # hidden size
    B: int = 1


def llama_config(path: Path = CONFIG) -> dict:
    return json.loads(Path(path).read_text())


def shape_of(cfg: dict) -> Shape:
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return Shape(cfg["num_attention_heads"], cfg["num_key_value_heads"], d, cfg["hidden_size"])


def core_flops(s: Shape, n: int) -> float:
    """Useful FLOPs of causal attention: q k^T and p v (2 d each) over the n (n + 1) / 2 allowed pairs per head.
    The same count for every implementation, so GFLOP/s compares time (naive computes the masked half too)."""
    return 4.0 * s.B * s.H * s.d * n * (n + 1) / 2


def flops_of(name: str, s: Shape, n: int) -> float:
    return core_flops(s, n) if name in CORE else layer_flops(s, n)


def layer_flops(s: Shape, n: int) -> float:
    proj = 2.0 * s.B * n * s.D * (s.H + 2 * s.Hkv) * s.d + 2.0 * s.B * n * s.H * s.d * s.D  # q, k, v and o
    return core_flops(s, n) + proj


def io_model(s: Shape, n: int, *, sram: int = H100_SMEM, elsize: int = 4) -> tuple[float, float]:
    """HBM bytes of the FlashAttention paper's IO analysis (non-causal, per query head, times H):
    standard attention (Algorithm 0): read Q, K (2Nd), write S (N^2); read S, write P (2N^2); read P, V, write O
    (N^2 + 2Nd): 4Nd + 4N^2 = Theta(Nd + N^2). FlashAttention (Algorithm 1, Theorem 2): K, V read once (2Nd); for
    each of Tc = N / Bc key blocks, Bc = ceil(M / 4d), Q and O read and O written (3Nd) plus l, m (4N):
    Theta(N^2 d^2 / M) for on-chip memory M (in elements)."""
    M = sram // elsize
    bc = math.ceil(M / (4 * s.d))
    naive = 4 * n * s.d + 4 * n * n
    tiled = 2 * n * s.d + math.ceil(n / bc) * (3 * n * s.d + 4 * n)
    return float(naive * s.H * s.B * elsize), float(tiled * s.H * s.B * elsize)


# ---------------------------------------------------------------------------------------------------------
# the cases: name -> (seq, device) -> a no-argument call on prepared inputs


@dataclass
class Case:
    name: str
    fn: Callable[[], object]  # the call that is measured
    flops: float


def _module(s: Shape):
    """What transformers' attention functions read off the attention module."""
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal, m.layer_idx = s.H // s.Hkv, True, 0
    return m.eval()


def make_case(name: str, s: Shape, n: int, cfg: dict, device: str = "cpu", seed: int = 0) -> Case:
    """Inputs for `name` at seq n, made here (outside the timing), and the call on them."""
    from impl import CORES, context_of, tiled

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return (torch.randn(*shape, generator=g) * std).to(device)

    if name in LAYER:
        x = rand(s.B, n, s.D)
        w = {
            "q_proj": rand(s.H * s.d, s.D, std=0.02),
            "k_proj": rand(s.Hkv * s.d, s.D, std=0.02),
            "v_proj": rand(s.Hkv * s.d, s.D, std=0.02),
            "o_proj": rand(s.D, s.H * s.d, std=0.02),
        }
        pos = torch.arange(n, device=device)[None].expand(s.B, n)
        if name == "layer_tiled":
            return Case(name, lambda: tiled.attention(x, w, config=cfg, position_ids=pos), layer_flops(s, n))
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        conf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}, attn_implementation="sdpa")
        with torch.device(device):
            attn = LlamaAttention(conf, layer_idx=0).eval()
            cos, sin = LlamaRotaryEmbedding(conf)(x, pos)  # computed once per forward, shared by all layers
        attn.load_state_dict({f"{k}.weight": t for k, t in w.items()})

        def hf_layer():
            with torch.no_grad():
                return attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]

        return Case(name, hf_layer, layer_flops(s, n))

    q, k, v = rand(s.B, s.H, n, s.d), rand(s.B, s.Hkv, n, s.d), rand(s.B, s.Hkv, n, s.d)
    flops = core_flops(s, n)
    if name in CORES:
        core = CORES[name]
        return Case(name, lambda: context_of(core(q, k, v)), flops)
    if name == "hf_eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        # eager is not causal by itself: the additive mask transformers builds for it, an input here
        bias = torch.full((n, n), torch.finfo(torch.float32).min, device=device).triu_(1)[None, None]
        m = _module(s)
        return Case(name, lambda: eager_attention_forward(m, q, k, v, bias, scaling=s.d**-0.5)[0], flops)
    if name == "hf_sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        m = _module(s)
        return Case(name, lambda: sdpa_attention_forward(m, q, k, v, None, scaling=s.d**-0.5)[0], flops)
    raise UserError(f"unknown implementation {name!r}: choose from {', '.join(CORE + LAYER)}")
