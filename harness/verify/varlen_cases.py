"""The packed variable-length matrix (contracts/varlen.py), FlashAttention's varlen convention, and transformers'
answers on it.

    inputs      q [total_q, H, d], k, v [total_k, Hkv, d]: the sequences one after another, no padding;
                cu_seqlens_q, cu_seqlens_k int32 [B + 1] (0, then the running totals); max_seqlen_q, max_seqlen_k
    scenarios   packed batches of mixed lengths (1, 15, 16, 17, hundreds) whose sequences must not see each other
                (causal and not); q shorter than k per sequence (bottom-right: query i of sequence b at position
                len_k - len_q + i), decoding sequences (one query) among prefilling ones; a sequence of length 1;
                GQA, MQA; the kernel variants' window, softcap and sinks; float32, bfloat16, float16
    reference   per sequence, the harness slices its own q, k, v by the offsets and runs transformers' functions on
                them as paged_cases.attend does (kernel_hf.forward, masking_utils' masks), in the dtype and float64
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.verify.kernels import SINKS, sliding
from harness.verify.paged_cases import Keywords, attend, half_lse_tol


@dataclass(frozen=True)
class VarlenScenario(Keywords):
    name: str
    isolates: str
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...] | None = None  # None: as lens_q (prefill); each >= its lens_q
    H: int = 8
    Hkv: int = 2
    d: int = 64
    causal: bool = True
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    mult: float = 1.0
    quick: bool = True
    seed: int = 0
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    sinks: tuple[float, float] | None = None

    @property
    def ks(self) -> tuple[int, ...]:
        return self.lens_k or self.lens_q


V = VarlenScenario
SCENARIOS = [
    V("packed_mixed", "5 sequences of 1, 15, 16, 17 and 300 tokens packed: none may see another",
      lens_q=(1, 15, 16, 17, 300)),
    V("packed_noncausal", "causal=False: every key of its own sequence, none of the next", lens_q=(7, 1, 33, 64),
      causal=False),
    V("q_shorter", "q shorter than k, bottom-right: chunked prefill and decoding sequences, a sequence of one key",
      lens_q=(1, 5, 17, 1), lens_k=(1, 40, 17, 300)),
    V("mqa_long", "one long sequence among short ones, MQA, head_dim 128", H=4, Hkv=1, d=128, lens_q=(3, 1000, 1),
      quick=False),
    V("window", "sliding window 17 in each packed sequence", window=sliding(17), lens_q=(40, 16, 100)),
    V("window_q_shorter", "window 32, q shorter than k", window=sliding(32), lens_q=(1, 9), lens_k=(100, 70),
      quick=False),
    V("softcap", "softcap 30, scores x50", softcap=30.0, mult=50**0.5, lens_q=(33, 1, 64), quick=False),
    V("sinks", "sinks above the scores, q shorter than k", sinks=SINKS["large"], lens_q=(1, 20, 5),
      lens_k=(30, 20, 5)),
    V("all_three", "window 17, softcap 30, scores x20, sinks", window=sliding(17), softcap=30.0, mult=20**0.5,
      sinks=(15.0, 30.0), lens_q=(50, 3, 20), lens_k=(50, 10, 20), quick=False),
    V("bf16", "bf16 packed, mixed lengths", dtype=torch.bfloat16, lens_q=(1, 17, 64)),
    V("fp16_q_shorter", "fp16, q shorter than k", dtype=torch.float16, lens_q=(3, 1), lens_k=(50, 20), quick=False),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}


def select(dtypes: set, quick: bool, slow_kernel: bool = False) -> list[VarlenScenario]:
    """slow_kernel (an interpreted one): the quick set."""
    return [s for s in SCENARIOS if s.dtype in dtypes and (s.quick or not (quick or slow_kernel))]


@dataclass
class VarlenInputs:
    q: torch.Tensor  # (total_q, H, d)
    k: torch.Tensor  # (total_k, Hkv, d)
    v: torch.Tensor
    cu_q: torch.Tensor  # (B + 1,) int32
    cu_k: torch.Tensor

    @property
    def max_q(self) -> int:
        return int((self.cu_q[1:] - self.cu_q[:-1]).max())

    @property
    def max_k(self) -> int:
        return int((self.cu_k[1:] - self.cu_k[:-1]).max())


def offsets(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def build(s) -> VarlenInputs:
    """A scenario's (or a probe's) packed inputs, seeded."""
    g = torch.Generator().manual_seed(s.seed)
    tq, tk = sum(s.lens_q), sum(s.ks)
    q = torch.randn(tq, s.H, s.d, generator=g) * s.mult
    k = torch.randn(tk, s.Hkv, s.d, generator=g) * s.mult
    v = torch.randn(tk, s.Hkv, s.d, generator=g)
    dt = s.dtype
    return VarlenInputs(q.to(dt), k.to(dt), v.to(dt), offsets(s.lens_q), offsets(s.ks))


def sequence(x: VarlenInputs, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (1, H, len_q, d), k, v (1, Hkv, len_k, d) of sequence b, sliced by the harness."""
    q = x.q[int(x.cu_q[b]) : int(x.cu_q[b + 1])]
    k, v = (t[int(x.cu_k[b]) : int(x.cu_k[b + 1])] for t in (x.k, x.v))
    return q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, heads, len, d)


def packed(t: torch.Tensor) -> torch.Tensor:
    """(1, H, n, d) -> (n, H, d): one sequence's rows as the contract packs them."""
    return t[0].transpose(0, 1)


@dataclass
class VarlenCase:
    x: VarlenInputs
    ref: torch.Tensor  # (total_q, H, d), the scenario's dtype
    ref64: torch.Tensor  # (total_q, H, d), float64
    lse64: torch.Tensor  # (H, total_q)
    keep: torch.Tensor  # (1, total_q)
    lse_tol: float
    sinks: torch.Tensor | None = None


def reference(s: VarlenScenario, cache: dict) -> VarlenCase:
    if s.name in cache:
        return cache[s.name]
    x = build(s)
    sinks = s.sink_logits()
    parts = [attend(*sequence(x, b), s, sinks) for b in range(len(s.lens_q))]
    ref = torch.cat([packed(p[0]) for p in parts])  # (total_q, H, d)
    ref64 = torch.cat([packed(p[1]) for p in parts])
    lse64 = torch.cat([p[2][0] for p in parts], -1)  # (H, total_q)
    lse_hf = torch.cat([p[3][0] for p in parts], -1)
    keep = torch.cat([p[4][0] for p in parts])[None]  # (1, total_q)
    case = VarlenCase(x, ref.contiguous(), ref64.contiguous(), lse64, keep,
                      half_lse_tol(s.dtype, lse_hf[None], lse64[None], keep), sinks)  # fmt: skip
    cache[s.name] = case
    return case


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(total_q, H, d) -> (1, total_q, H*d): the layout compare() reads, one row per query."""
    n, H, d = t.shape
    return t.reshape(1, n, H * d)  # (1, total_q, H*d)
