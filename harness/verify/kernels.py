"""The kernel matrix (contracts core.py and core_grad.py): scenarios in the manner of FlashAttention's own tests,
and transformers' answers on them.

    scenarios   Sq = Sk, Sq = 1 (decoding), Sq < Sk (chunked prefill); causal and not; head_dim 32 .. 256;
                MHA, GQA, MQA; lengths off every block multiple; padding; scores in the thousands; a given scale;
                float32, bfloat16, float16
    reference   transformers' eager_attention_forward in the scenario's dtype, and its sdpa_attention_forward in
                float64 (eager's softmax is float32 whatever the input); lse as float64 logsumexp
    compare     the same tolerance policy as layers (compare.py), on out [B, Sq, H*d] over rows that see a key;
                lse, when returned, within LSE_TOL of float64
    diagnose    diagnosis/kernel.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from harness.verify.diagnosis.evidence import maxdiff

LSE_TOL = 1e-3  # float32, natural-log units: 0.1% on every probability; far above float32 rounding
# half precision: the FlashAttention rule, 2x the error of HF's own scores (matmul in the dtype, logsumexp in
# float32, as its eager path computes them) against float64, plus LSE_TOL


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
]
BY_NAME = {s.name: s for s in SCENARIOS}
# The Triton interpreter runs a kernel in Python: on a CPU it gets the quick set plus these (chosen by measured
# interpreter time: every kind of case, no length above 257).
INTERPRETER_EXTRA = {"mqa_257_d128", "scores_x25", "float16", "bf16_decode"}


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


def allowed(s: KernelScenario, mask) -> torch.Tensor:
    """(B|1, 1, Sq, Sk) bool, written here from the contract (not from impl/)."""
    i = torch.arange(s.Sq)[:, None] + (s.Sk - s.Sq)
    keep = (torch.arange(s.Sk)[None, :] <= i) if s.causal else torch.ones(s.Sq, s.Sk, dtype=torch.bool)
    keep = keep[None, None]
    if mask is not None:
        keep = keep & mask.bool()[:, None, None, :]
    return keep


def _module(H: int, Hkv: int):
    m = torch.nn.Module()
    m.num_key_value_groups, m.training, m.is_causal = H // Hkv, False, False
    return m


@dataclass
class KernelCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    ref: torch.Tensor  # (B, H, Sq, d), the scenario's dtype
    ref64: torch.Tensor  # (B, H, Sq, d), float64
    lse64: torch.Tensor  # (B, H, Sq)
    keep: torch.Tensor  # (B, Sq) rows that see at least one key
    lse_tol: float


def reference(s: KernelScenario, cache: dict) -> KernelCase:
    if s.name in cache:
        return cache[s.name]
    q, k, v, mask = s.build()
    keep4 = allowed(s, mask).expand(q.shape[0], 1, s.Sq, s.Sk)
    scale = s.d**-0.5 if s.scale is None else s.scale
    m = _module(s.H, s.Hkv)

    def additive(dtype):
        return torch.zeros(keep4.shape, dtype=dtype).masked_fill(~keep4, torch.finfo(dtype).min)

    with torch.no_grad():
        ref = eager_attention_forward(m, q, k, v, additive(q.dtype), scaling=scale)[0].transpose(1, 2)
        q64, k64, v64 = q.double(), k.double(), v.double()
        ref64 = sdpa_attention_forward(m, q64, k64, v64, additive(torch.float64), scaling=scale)[0].transpose(1, 2)
        sc = (q64 @ k64.repeat_interleave(s.H // s.Hkv, 1).transpose(-2, -1)) * scale
        lse64 = torch.logsumexp(sc.masked_fill(~keep4, float("-inf")), dim=-1)  # (B, H, Sq)
        hf = (q @ k.repeat_interleave(s.H // s.Hkv, 1).transpose(-2, -1)).float() * scale  # HF's scores
        lse_hf = torch.logsumexp(hf.masked_fill(~keep4, float("-inf")), dim=-1)
    rows = keep4[:, 0].any(-1)  # (B, Sq)
    tol = LSE_TOL
    if s.dtype != torch.float32:
        tol += 2 * maxdiff(lse_hf, lse64, rows[:, None, :].expand_as(lse64))
    case = KernelCase(q, k, v, mask, ref.contiguous(), ref64.contiguous(), lse64, rows, tol)
    cache[s.name] = case
    return case


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, d) -> (B, Sq, H*d): the layout compare() reads, one row per query."""
    B, H, Sq, d = t.shape
    return t.transpose(1, 2).reshape(B, Sq, H * d)  # (B, Sq, H*d)


def lse_error(lse: torch.Tensor, c: KernelCase) -> float:
    keep = c.keep[:, None, :].expand_as(lse)
    return maxdiff(lse, c.lse64, keep)
