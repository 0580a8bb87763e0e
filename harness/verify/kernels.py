"""The kernel matrix (contracts core.py and core_grad.py): scenarios in the manner of FlashAttention's own tests,
and transformers' answers on them.

    scenarios   Sq = Sk, Sq = 1 (decoding), Sq < Sk (chunked prefill); causal and not; head_dim 32 .. 256;
                MHA, GQA, MQA; lengths off every block multiple; padding; scores in the thousands; a given scale;
                float32, bfloat16, float16; and the contract's three keywords: sliding windows (window), logit
                softcapping (softcap) and attention sinks (sinks), alone and together
    reference   transformers' own functions (kernel_hf.py): llama's eager_attention_forward in the scenario's
                dtype and sdpa_attention_forward in float64 for plain attention; gemma2's eager function for
                softcap, gpt_oss's for sinks; the window as masking_utils' mask functions build it; float64 kept
                float64 throughout; lse as float64 logsumexp, the sink's term included
    compare     the same tolerance policy as layers (compare.py), on out [B, Sq, H*d] over rows that see a key;
                lse, when returned, within LSE_TOL of float64
    skipped     a scenario that uses a keyword the kernel's signature lacks is not run (contracts/core.py)
    diagnose    diagnosis/kernel.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.verify import kernel_hf
from harness.verify.diagnosis.evidence import maxdiff

LSE_TOL = 1e-3  # float32, natural-log units: 0.1% on every probability; far above float32 rounding
# half precision: the FlashAttention rule, 2x the error of HF's own scores (matmul in the dtype, logsumexp in
# float32, as its eager path computes them) against float64, plus LSE_TOL
KEYWORDS = ("window", "softcap", "sinks")  # the contract's optional keywords, passed only when a scenario uses them

# sink logits per query head, drawn uniformly from these ranges (seeded): near the scores (whose spread is about 1
# at scores x1), above them (the sink takes most of the mass) and below them (a small share, still > 1e-3)
SINKS = {"small": (-1.0, 1.0), "large": (4.0, 8.0), "negative": (-4.0, -1.0)}


@dataclass(frozen=True)
class KernelScenario:
    name: str
    isolates: str
    B: int = 1
    H: int = 8
    Hkv: int = 2
    Sq: int = 17
    Sk: int = 17
    d: int = 64
    causal: bool = True
    dtype: torch.dtype = torch.float32
    pads: tuple[int, ...] | None = None  # left padding per batch row (keys); B = len(pads)
    scale: float | None = None
    mult: float = 1.0  # q and k multiplied by this: scores grow by its square
    quick: bool = True
    seed: int = 0
    window: tuple[int, int] | None = None  # (left, right) as FlashAttention's window_size; -1 = unbounded
    softcap: float = 0.0
    sinks: tuple[float, float] | None = None  # the range the per-head sink logits are drawn from (SINKS)

    def uses(self) -> tuple[str, ...]:
        """The contract's optional keywords this scenario passes (the others are not passed at all)."""
        used = {"window": self.window is not None, "softcap": bool(self.softcap), "sinks": self.sinks is not None}
        return tuple(k for k in KEYWORDS if used[k])

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        B = len(self.pads) if self.pads else self.B
        q = torch.randn(B, self.H, self.Sq, self.d, generator=g) * self.mult
        k = torch.randn(B, self.Hkv, self.Sk, self.d, generator=g) * self.mult
        v = torch.randn(B, self.Hkv, self.Sk, self.d, generator=g)
        mask = None
        if self.pads:
            mask = torch.ones(B, self.Sk, dtype=torch.long)
            for b, p in enumerate(self.pads):
                mask[b, :p] = 0
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), mask

    def sink_logits(self) -> torch.Tensor | None:
        """float32 [H], one logit per query head (distinct per head: a sink read by KV head shows), or None."""
        if self.sinks is None:
            return None
        lo, hi = self.sinks
        return lo + (hi - lo) * torch.rand(self.H, generator=torch.Generator().manual_seed(self.seed + 7))


def sliding(W: int) -> tuple[int, int]:
    """transformers' sliding_window=W on a causal layer, as a window: (W - 1, 0)."""
    return (W - 1, 0)


S = KernelScenario
SCENARIOS = [
    S("one_token", "a single key: out = v of the query head's KV head", Sq=1, Sk=1),
    S("prefill_17", "GQA g=4, a length off every block", B=2),
    S("mha_113_d32", "MHA, head_dim 32", H=4, Hkv=4, Sq=113, Sk=113, d=32),
    S("mqa_257_d128", "MQA, head_dim 128, one past a block", H=4, Hkv=1, Sq=257, Sk=257, d=128, quick=False),
    S("gqa_1000_d96", "GQA, head_dim 96 (not a power of two)", H=6, Hkv=2, Sq=1000, Sk=1000, d=96, quick=False),
    S("long_2048", "float32 accumulation over 2048 keys", H=2, Hkv=1, Sq=2048, Sk=2048, quick=False),
    S("long_4099", "a long length off every block", H=1, Hkv=1, Sq=4099, Sk=4099, quick=False),
    S("d256", "head_dim 256", H=2, Hkv=1, Sq=64, Sk=64, d=256),
    S("decode_1", "decoding: one query, bottom-right causal (it sees every key)", Sq=1, Sk=300),
    S("chunk_17_of_300", "chunked prefill: Sq < Sk, bottom-right causal", Sq=17, Sk=300),
    S("noncausal", "causal=False: every key", Sq=113, Sk=113, causal=False),
    S("noncausal_chunk", "causal=False with Sq < Sk", Sq=17, Sk=200, causal=False),
    S("padding", "left padding of the keys; a row with one real key", Sq=64, Sk=64, pads=(0, 12, 63)),
    S("scale_0.3", "a given scale instead of 1/sqrt(d)", Sq=64, Sk=64, scale=0.3),
    S("scores_x25", "scores in the thousands: the running max", Sq=128, Sk=128, mult=25.0, quick=False),
    S("bfloat16", "bf16 inputs, float32 softmax and accumulation", Sq=128, Sk=128, dtype=torch.bfloat16),
    S("bf16_decode", "bf16, Sq < Sk", Sq=1, Sk=257, dtype=torch.bfloat16, quick=False),
    S("float16", "fp16 inputs", Sq=128, Sk=128, dtype=torch.float16, quick=False),
    # window: transformers' sliding_window W is (W - 1, 0); each binds at its length (a key leaves the window)
    S("window_1", "sliding window 1: each query sees itself only", Sq=40, Sk=40, window=sliding(1), quick=False),
    S("window_17", "sliding window 17 over 113 keys", Sq=113, Sk=113, window=sliding(17)),
    S("window_64_len63", "window 64, length W - 1: nothing leaves it", Sq=63, Sk=63, window=sliding(64),
      quick=False),
    S("window_64_len64", "window 64, length W: the last query still sees key 0", Sq=64, Sk=64, window=sliding(64),
      quick=False),
    S("window_64_len65", "window 64, length W + 1: key 0 leaves the last query's window (an off by one shows)",
      Sq=65, Sk=65, window=sliding(64)),
    S("window_64_len131", "window 64, length 2W + 3, head_dim 128", H=4, Hkv=1, Sq=131, Sk=131, d=128,
      window=sliding(64), quick=False),
    S("window_257", "window 257 over 600 keys (one past a block), head_dim 128", H=2, Hkv=1, Sq=600, Sk=600, d=128,
      window=sliding(257), quick=False),
    S("window_past_seq", "window 300 over 200 keys: larger than the sequence, plain causal", Sq=200, Sk=200,
      window=sliding(300), quick=False),
    S("window_full_causal", "window (S - 1, 0) with causal: exactly causal", Sq=113, Sk=113, window=(112, 0),
      quick=False),
    S("window_unbounded", "window (-1, -1): unbounded both sides, plain causal", Sq=64, Sk=64, window=(-1, -1),
      quick=False),
    S("window_decode", "decoding past the window: one query, the last 64 of 300 keys", Sq=1, Sk=300,
      window=sliding(64), quick=False),
    S("window_chunk", "chunked prefill past the window: 17 queries, windows bottom-right aligned", Sq=17, Sk=300,
      window=sliding(64)),
    S("window_padding", "padding inside the early windows, outside the later ones; rows whose window is all padding",
      Sq=100, Sk=100, pads=(0, 12, 90), window=sliding(17), quick=False),
    S("window_bidir", "causal=False, window (8, 8)", Sq=100, Sk=100, causal=False, window=(8, 8), quick=False),
    S("window_asym", "causal=False, window (20, 3), Sq < Sk: the right edge clipped at the last key", Sq=17,
      Sk=200, causal=False, window=(20, 3), quick=False),
    S("window_d256", "window 64 over 200 keys, head_dim 256", H=2, Hkv=1, Sq=200, Sk=200, d=256,
      window=sliding(64), quick=False),
    S("window_bf16", "bf16, window 64 over 300 keys", Sq=300, Sk=300, dtype=torch.bfloat16, window=sliding(64),
      quick=False),
    S("window_fp16", "fp16, chunked prefill past window 64", Sq=17, Sk=300, dtype=torch.float16, window=sliding(64),
      quick=False),
    # softcap: scores x25 and x50 (q and k x5, x7.07) bend through tanh; x625 (q, k x25) saturate it
    S("softcap_50_x25", "softcap 50, scores x25, head_dim 128", H=4, Hkv=1, Sq=128, Sk=128, d=128, softcap=50.0,
      mult=5.0, quick=False),
    S("softcap_30_x50", "softcap 30, scores x50", Sq=64, Sk=64, softcap=30.0, mult=50**0.5),
    S("softcap_50_x625", "softcap 50, scores x625: saturated, keys near the cap nearly tie", Sq=128, Sk=128,
      softcap=50.0, mult=25.0, quick=False),
    S("softcap_chunk", "softcap 30, scores x25, Sq < Sk", Sq=17, Sk=300, softcap=30.0, mult=5.0, quick=False),
    S("softcap_bf16", "bf16, softcap 30, scores x25", Sq=128, Sk=128, dtype=torch.bfloat16, softcap=30.0, mult=5.0,
      quick=False),
    S("softcap_fp16", "fp16, softcap 50, scores x25", Sq=128, Sk=128, dtype=torch.float16, softcap=50.0, mult=5.0,
      quick=False),
    # sinks: one logit per query head in the softmax's denominator, no value
    S("sinks_small", "sinks near the scores", Sq=64, Sk=64, sinks=SINKS["small"], quick=False),
    S("sinks_large", "sinks above the scores: most of the mass", Sq=64, Sk=64, sinks=SINKS["large"]),
    S("sinks_negative", "negative sinks: a small share", Sq=33, Sk=33, sinks=SINKS["negative"], quick=False),
    S("sinks_decode", "sinks, decoding", Sq=1, Sk=300, sinks=SINKS["large"], quick=False),
    S("sinks_padding", "sinks with padding; a row with one real key", Sq=64, Sk=64, pads=(0, 12, 63),
      sinks=SINKS["small"], quick=False),
    S("sinks_d256", "sinks, head_dim 256", H=2, Hkv=1, Sq=64, Sk=64, d=256, sinks=SINKS["large"], quick=False),
    S("sinks_bf16", "bf16, sinks (float32)", Sq=128, Sk=128, dtype=torch.bfloat16, sinks=SINKS["large"],
      quick=False),
    S("sinks_fp16", "fp16, sinks (float32), Sq < Sk", Sq=17, Sk=300, dtype=torch.float16, sinks=SINKS["large"],
      quick=False),
    # all three: the sinks at the capped scores' scale, or they would vanish behind keys scored near the cap
    S("all_three", "window 17, softcap 30, scores x20, sinks at the scores' scale, padding", Sq=100, Sk=100,
      pads=(0, 20), window=sliding(17), softcap=30.0, mult=20**0.5, sinks=(15.0, 30.0)),
    S("all_three_decode", "window 64, softcap 50, scores x25, sinks, decoding", Sq=1, Sk=300, window=sliding(64),
      softcap=50.0, mult=5.0, sinks=(20.0, 40.0), quick=False),
    S("all_three_chunk", "window 64, softcap 30, scores x20, sinks, Sq < Sk, head_dim 128", H=4, Hkv=1, Sq=17,
      Sk=300, d=128, window=sliding(64), softcap=30.0, mult=20**0.5, sinks=(15.0, 30.0), quick=False),
    S("all_three_bf16", "bf16, window 17, softcap 30, scores x20, sinks", Sq=128, Sk=128, dtype=torch.bfloat16,
      window=sliding(17), softcap=30.0, mult=20**0.5, sinks=(15.0, 30.0), quick=False),
    S("all_three_fp16", "fp16, window 64, softcap 50, scores x25, sinks", Sq=200, Sk=200, dtype=torch.float16,
      window=sliding(64), softcap=50.0, mult=5.0, sinks=(20.0, 40.0), quick=False),
]
BY_NAME = {s.name: s for s in SCENARIOS}
# The Triton interpreter runs a kernel in Python: on a CPU it gets the quick set plus these (chosen by measured
# interpreter time: every kind of case, no length above 257; window_decode and all_three_bf16, one query and 128,
# added for the window/softcap/sinks keywords before the Triton kernel took them: to be re-measured then).
INTERPRETER_EXTRA = {"mqa_257_d128", "scores_x25", "float16", "bf16_decode", "window_decode", "all_three_bf16"}


def select(dtypes: set, quick: bool, slow_kernel: bool = False) -> list[KernelScenario]:
    out = []
    for s in SCENARIOS:
        if s.dtype not in dtypes:
            continue
        if quick and not s.quick:
            continue
        if slow_kernel and not (s.quick or s.name in INTERPRETER_EXTRA):
            continue
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# reference


def scale_of(s: KernelScenario) -> float:
    return s.d**-0.5 if s.scale is None else s.scale


def allowed(s: KernelScenario, mask) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: the keys each query sees, as transformers' masking_utils builds the mask (kernel_hf)."""
    B = mask.shape[0] if mask is not None else (len(s.pads) if s.pads else s.B)
    return kernel_hf.allowed(B, s.Sq, s.Sk, s.causal, s.window, mask)


@dataclass
class KernelCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    ref: torch.Tensor  # (B, H, Sq, d), the scenario's dtype
    ref64: torch.Tensor  # (B, H, Sq, d), float64
    lse64: torch.Tensor  # (B, H, Sq), the sink's term included
    keep: torch.Tensor  # (B, Sq) rows that see at least one key
    lse_tol: float
    sinks: torch.Tensor | None = None  # float32 [H], as the kernel is given them


def reference(s: KernelScenario, cache: dict) -> KernelCase:
    if s.name in cache:
        return cache[s.name]
    q, k, v, mask = s.build()
    sinks = s.sink_logits()
    keep4 = allowed(s, mask)
    scale, cap = scale_of(s), s.softcap
    with torch.no_grad():
        ref = kernel_hf.forward(q, k, v, keep4, scale, cap, sinks)
        ref64 = kernel_hf.forward(q.double(), k.double(), v.double(), keep4, scale, cap, sinks, path="float64")
        lse64 = kernel_hf.lse(q, k, keep4, scale, cap, sinks)  # (B, H, Sq)
        lse_hf = kernel_hf.lse(q, k, keep4, scale, cap, sinks, float64=False)  # HF's scores, float32 after
    rows = keep4[:, 0].any(-1)  # (B, Sq)
    tol = LSE_TOL
    if s.dtype != torch.float32:
        tol += 2 * maxdiff(lse_hf, lse64, rows[:, None, :].expand_as(lse64))
    case = KernelCase(q, k, v, mask, ref.contiguous(), ref64.contiguous(), lse64, rows, tol, sinks)
    cache[s.name] = case
    return case


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, d) -> (B, Sq, H*d): the layout compare() reads, one row per query."""
    B, H, Sq, d = t.shape
    return t.transpose(1, 2).reshape(B, Sq, H * d)  # (B, Sq, H*d)


def lse_error(lse: torch.Tensor, c: KernelCase) -> float:
    keep = c.keep[:, None, :].expand_as(lse)
    return maxdiff(lse, c.lse64, keep)
