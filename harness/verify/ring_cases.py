"""The ring contract's inputs: scenarios, how a sequence is cut into the ranks' shards (the judge's own layouts, never
the code's), and the references on the whole sequence.

    layouts     contiguous: rank r holds tokens [r S/W, (r + 1) S/W); zigzag: 2W equal chunks, rank r holds chunk r
                then chunk 2W - 1 - r (ring-flash-attention's zigzag: every rank gets as much causal work)
    lengths     a length that does not divide is padded at the end to a multiple of 2W with zero tokens, causal
                scenarios only (a causal query never sees a later key, so the padding changes no real output); only
                the real tokens are compared, and the scenario's name says `padded`
    reference   transformers' eager_attention_forward on the whole (unpadded) sequence (kernel_hf.forward), in the
                dtype and in float64; the lse in float64 (kernel_hf.lse)
    tolerance   the forward policy (compare.py) on the gathered output; the lse within kernels.LSE_TOL of float64
                (float32), plus twice transformers' own lse error in bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from harness.verify import kernel_hf
from harness.verify.kernels import LSE_TOL, maxdiff, rows_of

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class RingScenario:
    name: str
    S: int  # real tokens
    causal: bool = True
    B: int = 2
    H: int = 4
    Hkv: int = 4
    d: int = 16
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    gain: float = 1.0  # on q: larger scores make every block's max differ, which an unrescaled merge cannot hide

    def build(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sum(map(ord, self.name)))
        q = torch.randn(self.B, self.H, self.S, self.d, generator=g) * self.gain
        k = torch.randn(self.B, self.Hkv, self.S, self.d, generator=g)
        v = torch.randn(self.B, self.Hkv, self.S, self.d, generator=g)
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)


SCENARIOS = (
    RingScenario("causal_64", 64),
    RingScenario("noncausal_64", 64, causal=False),
    RingScenario("gqa_8_2", 64, B=1, H=8, Hkv=2, d=32),
    RingScenario("len_61_padded", 61),
    RingScenario("scores_x8", 64, B=1, H=2, Hkv=2, gain=8.0),
    RingScenario("scale_0.3", 64, B=1, H=2, Hkv=1, scale=0.3, causal=False),
    RingScenario("len_256", 256, B=1, H=2, Hkv=2),
    RingScenario("bfloat16", 32, B=1, H=4, Hkv=2, dtype=torch.bfloat16),
)
QUICK = ("causal_64", "noncausal_64", "gqa_8_2", "len_61_padded", "scale_0.3", "bfloat16")


@dataclass(frozen=True)
class RingCase:
    """One scenario on W ranks in one layout: what the loop runs (its name, its dtype)."""

    s: RingScenario
    W: int
    layout: str

    @property
    def name(self) -> str:
        return f"{self.s.name}/{self.layout}"

    @property
    def dtype(self) -> torch.dtype:
        return self.s.dtype

    @property
    def causal(self) -> bool:
        return self.s.causal

    @property
    def scale(self) -> float | None:
        return self.s.scale

    @property
    def padded(self) -> int:
        """The length the ranks get: a multiple of 2W (both layouts cut the same sequence)."""
        unit = 2 * self.W
        return -(-self.s.S // unit) * unit


def select(dtypes: set, quick: bool, W: int, layouts: tuple[str, ...]) -> list[RingCase]:
    """The scenarios in the dtypes asked, in every layout the code declares. A non-causal scenario cannot be padded
    (every query would see the padding): on a world its length does not divide (torchrun's W = 3), it is cut to
    the largest multiple of 2W instead."""
    names = QUICK if quick else tuple(s.name for s in SCENARIOS)
    fit = [s if s.causal or s.S % (2 * W) == 0 else replace(s, S=s.S - s.S % (2 * W)) for s in SCENARIOS]
    return [RingCase(s, W, lay) for s in fit if s.name in names and s.dtype in dtypes for lay in layouts]


def tokens(S: int, W: int, layout: str, r: int) -> torch.Tensor:
    """The global positions of rank r's tokens, in the order its shard holds them."""
    if layout == "contiguous":
        n = S // W
        return torch.arange(r * n, (r + 1) * n)
    c = S // (2 * W)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * W - 1 - r) * c, (2 * W - r) * c)])


def shard(x: torch.Tensor, W: int, layout: str) -> list[torch.Tensor]:
    """(B, H, S, d) -> W shards (B, H, S/W, d), rank by rank."""
    return [x[:, :, tokens(x.shape[2], W, layout, r)].contiguous() for r in range(W)]


def unshard(parts: list[torch.Tensor], layout: str) -> torch.Tensor:
    """W shards (B, H, S/W, ...) -> (B, H, S, ...): each token back at its global position."""
    W, n = len(parts), parts[0].shape[2]
    out = parts[0].new_zeros(*parts[0].shape[:2], n * W, *parts[0].shape[3:])
    for r, p in enumerate(parts):
        out[:, :, tokens(n * W, W, layout, r)] = p
    return out


def pad(x: torch.Tensor, S: int) -> torch.Tensor:
    """(B, H, s, d) -> (B, H, S, d): zero tokens after the last real one."""
    return torch.cat([x, x.new_zeros(*x.shape[:2], S - x.shape[2], *x.shape[3:])], 2)


@dataclass
class RingRef:
    q: torch.Tensor  # (B, H, S, d), the real tokens
    k: torch.Tensor
    v: torch.Tensor
    ref: torch.Tensor  # (B, H, S, d) transformers in the dtype
    ref64: torch.Tensor  # float64
    lse64: torch.Tensor  # (B, H, S)
    lse_tol: float
    keep4: torch.Tensor  # (B, 1, S, S) the keys each query sees
    scale: float


def reference(s: RingScenario, cache: dict) -> RingRef:
    if (s.name, s.S) in cache:
        return cache[(s.name, s.S)]
    q, k, v = s.build()
    keep4 = kernel_hf.allowed(s.B, s.S, s.S, s.causal, None, None)
    scale = s.d**-0.5 if s.scale is None else s.scale
    with torch.no_grad():
        ref = kernel_hf.forward(q, k, v, keep4, scale)
        ref64 = kernel_hf.forward(q.double(), k.double(), v.double(), keep4, scale, path="float64")
        lse64 = kernel_hf.lse(q, k, keep4, scale)
        lse_hf = kernel_hf.lse(q, k, keep4, scale, float64=False)
    every = torch.ones_like(lse64, dtype=torch.bool)
    tol = LSE_TOL if s.dtype == torch.float32 else LSE_TOL + 2 * maxdiff(lse_hf, lse64, every)
    cache[(s.name, s.S)] = RingRef(q, k, v, ref.contiguous(), ref64.contiguous(), lse64, tol, keep4, scale)
    return cache[(s.name, s.S)]


def inputs(c: RingCase, r: RingRef) -> list[dict]:
    """Each rank's q, k, v: the sequence padded to the case's length, cut by its layout."""
    parts = [shard(pad(x, c.padded), c.W, c.layout) for x in (r.q, r.k, r.v)]
    return [{"q": q, "k": k, "v": v} for q, k, v in zip(*parts, strict=True)]


def gathered(parts: list[torch.Tensor], c: RingCase) -> torch.Tensor:
    """The ranks' outputs (B, H, S/W, ...) -> the whole real sequence (B, H, S, ...)."""
    return unshard(parts, c.layout)[:, :, : c.s.S]


def lse_error(lse: torch.Tensor, r: RingRef) -> float:
    return maxdiff(lse, r.lse64, torch.ones_like(r.lse64, dtype=torch.bool))


def ideal_bytes(c: RingCase) -> int:
    """The ring's forward ideal per rank: (W - 1) x its K and V shard bytes."""
    s = c.s
    shard_bytes = s.B * s.Hkv * (c.padded // c.W) * s.d * torch.finfo(s.dtype).bits // 8
    return (c.W - 1) * 2 * shard_bytes


__all__ = ["LAYOUTS", "RingCase", "RingRef", "RingScenario", "gathered", "inputs", "reference", "rows_of", "select"]
