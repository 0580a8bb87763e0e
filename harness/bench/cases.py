"""The calls measured: one per implementation on the same q, k, v (projected and rotated once, outside the
timing): naive, loop, tiled, sdpa, triton (ours) and transformers' eager and sdpa attention functions (anchors);
plus the whole layer (projections included) for tiled and for transformers' LlamaAttention. Backward cases: the
gradient call alone, on a forward state and an output gradient prepared outside the timing. Their useful FLOPs, the
FlashAttention paper's IO model to draw beside the measured traffic, and the Triton kernel's traffic in closed form
(triton_traffic.py) at the bench's shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.bench.meter import Meter
from harness.bench.triton_traffic import traffic_model
from harness.checkpoints.store import config_of
from harness.common import UserError
from impl import CORES, context_of, tiled

CONFIG = config_of("llama-3.2-1b")  # the committed config: a checkout's fixtures/ or the installed package data
CORE = ("naive", "loop", "tiled", "sdpa", "triton", "hf_eager", "hf_sdpa")
LAYER = ("layer_tiled", "layer_hf")
BACKWARD = ("naive", "tiled", "sdpa", "hf_eager", "hf_sdpa")  # the cases that have a backward call
BACKWARD_ROWS = ("naive", "tiled", "sdpa")  # the ones `--backward` measures unless --impl names others
INTERPRETED = ("triton",)  # Triton kernels: compiled on CUDA, run in Triton's interpreter on a CPU
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


def pairs(n: int, window: int | None = None) -> int:
    """(query, key) pairs causal attention allows: n (n + 1) / 2, or with a window of W keys (transformers'
    sliding_window W, the kernel's (W - 1, 0)) min(i + 1, W) for query i: W (W + 1) / 2 + (n - W) W past W."""
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def core_flops(s: Shape, n: int, window: int | None = None) -> float:
    """Useful FLOPs of causal attention: q k^T and p v (2 d each) over the allowed pairs per head. The same count
    for every implementation, so GFLOP/s compares time (naive computes the masked half too)."""
    return 4.0 * s.B * s.H * s.d * pairs(n, window)


def backward_flops(s: Shape, n: int, window: int | None = None) -> float:
    """Useful FLOPs of the causal backward: dV = P^T dO, dP = dO V^T, dS K and dS^T Q (2 d each) over the allowed
    pairs, twice the forward's. FlashAttention's recomputation of S (a fifth product) gets no credit, as naive's
    masked half gets none."""
    return 2 * core_flops(s, n, window)


def flops_of(name: str, s: Shape, n: int, direction: str = "forward", window: int | None = None) -> float:
    if direction == "backward":
        return backward_flops(s, n, window)
    return core_flops(s, n, window) if name in CORE else layer_flops(s, n)


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
    flash = 2 * n * s.d + math.ceil(n / bc) * (3 * n * s.d + 4 * n)
    return float(naive * s.H * s.B * elsize), float(flash * s.H * s.B * elsize)


def triton_traffic(s: Shape, n: int, window: int | None = None) -> dict:
    """The Triton kernel's global loads and stores at seq n (float32, causal, its default blocks; a window of W
    keys), in closed form: triton_traffic.traffic_model, exact against kernel_traffic's count of the interpreted
    kernel."""
    return traffic_model(s.B, s.H, s.Hkv, n, n, s.d, dtype=torch.float32, causal=True, window=band(window))


def band(window: int | None) -> tuple[int, int] | None:
    """A window of W keys (transformers' sliding_window W) as the core contract's window=(left, right)."""
    return None if window is None else (window - 1, 0)


def triton_alloc(s: Shape, n: int) -> int:
    """Bytes the Triton kernel allocates: its outputs, out (B, H, n, d) and lse (B, H, n) float32; no scratch."""
    return 4 * s.B * s.H * n * (s.d + 1)


# ---------------------------------------------------------------------------------------------------------
# the cases: name -> (seq, device) -> a no-argument call on prepared inputs


@dataclass
class Case:
    name: str
    fn: Callable[[], object]  # the call that is measured
    flops: float
    direction: str = "forward"
    held: int = 0  # backward: bytes of the forward's state (saved tensors and out), alive before and after the call
    inputs: tuple = ()  # backward: (q, k, v, dout), for checking the gradients


def _module(s: Shape):
    """What transformers' attention functions read off the attention module."""
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal, m.layer_idx = s.H // s.Hkv, True, 0
    return m.eval()


def make_case(name: str, s: Shape, n: int, cfg: dict, device="cpu", seed: int = 0,
              direction: str = "forward", window: int | None = None) -> Case:
    """Inputs for `name` at seq n, made here (outside the timing), and the call on them; window: each query sees
    its last `window` keys (a core case only)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device="meta")
        return (torch.randn(*shape, generator=g) * std).to(device)

    if name in LAYER:
        if window is not None:
            raise UserError(f"{name}: no windowed case; windowed rows are for {', '.join(CORE)}")
        if direction != "forward":
            raise UserError(f"{name}: no backward case; backward rows are for {', '.join(BACKWARD)}")
        return _layer_case(name, s, n, cfg, device, rand)
    q, k, v = rand(s.B, s.H, n, s.d), rand(s.B, s.Hkv, n, s.d), rand(s.B, s.Hkv, n, s.d)
    attn = _core_call(name, s, n, device, window)  # (q, k, v) -> out (B, H, n, d)
    if direction == "forward":
        return Case(name, lambda: attn(q, k, v), core_flops(s, n, window))
    if name not in BACKWARD:
        raise UserError(f"{name}: no backward case; backward rows are for {', '.join(BACKWARD)}")
    # The backward alone: the forward runs here, recording its graph (and, under the meter, the bytes it keeps
    # for the backward); each measured call is one autograd.grad through it, the graph kept for the next call.
    dout = rand(s.B, s.H, n, s.d)
    for t in (q, k, v):
        t.requires_grad_()
    with torch.enable_grad(), Meter() as m:
        out = attn(q, k, v)
    return Case(name, lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                backward_flops(s, n, window), direction, held=m.live, inputs=(q, k, v, dout))  # fmt: skip


def _layer_case(name: str, s: Shape, n: int, cfg: dict, device, rand) -> Case:
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
    from transformers import LlamaConfig  # lazy: transformers is slow to import
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # lazy: as above

    conf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}, attn_implementation="sdpa")
    with torch.device(device):
        attn = LlamaAttention(conf, layer_idx=0).eval()
        cos, sin = LlamaRotaryEmbedding(conf)(x, pos)  # computed once per forward, shared by all layers
    attn.load_state_dict({f"{k}.weight": t for k, t in w.items()})

    def hf_layer():
        with torch.no_grad():
            return attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]

    return Case(name, hf_layer, layer_flops(s, n))


def _core_call(name: str, s: Shape, n: int, device, window: int | None = None) -> Callable:
    """(q, k, v) -> out (B, H, n, d) for a core case (transformers' (B, n, H, d) outputs as a transposed view)."""
    if name in CORES:
        core = CORES[name]
        kw = {} if window is None else {"window": band(window)}
        return lambda q, k, v: context_of(core(q, k, v, **kw))
    if name == "hf_eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward  # lazy: slow to import

        m, bias = _module(s), _bias(n, device, window)
        return lambda q, k, v: eager_attention_forward(m, q, k, v, bias, scaling=s.d**-0.5)[0].transpose(1, 2)
    if name == "hf_sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: slow to import

        m, bias = _module(s), None if window is None else _bias(n, device, window)  # None: is_causal
        return lambda q, k, v: sdpa_attention_forward(m, q, k, v, bias, scaling=s.d**-0.5)[0].transpose(1, 2)
    raise UserError(f"unknown implementation {name!r}: choose from {', '.join(CORE + LAYER)}")


def _bias(n: int, device, window: int | None) -> torch.Tensor:
    """The additive mask transformers builds for its attention functions (they are not causal by themselves): 0
    where query i may see key j (j <= i, and i - j < window), the float32 minimum elsewhere. An input here."""
    i = torch.arange(n, device=device)
    hidden = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= (n if window is None else window))  # (n, n)
    return torch.zeros(n, n, device=device).masked_fill_(hidden, torch.finfo(torch.float32).min)[None, None]
