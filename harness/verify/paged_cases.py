"""The paged KV-cache matrix (contracts/paged.py), in the manner of vLLM's and FlashInfer's tests, and transformers'
answers on it.

    the cache   k_cache, v_cache [num_blocks, page, Hkv, d]: token t of sequence b at block block_table[b, t // page],
                slot t % page. Every slot no sequence owns (the tail of a sequence's last page, every block no
                sequence uses) holds NaN, so a kernel that reads one shows it
    the table   block_table [B, max_blocks] int32, shuffled: no sequence's pages are contiguous (block n followed by
                block n + 1) or in increasing order; the cache holds many more blocks than the batch uses, and the
                cache's last block is among the used ones (an index bound off by one reads past the end); one column
                more than the longest sequence needs, so every row has entries past its length (unowned blocks: the
                contract calls them arbitrary)
    scenarios   page sizes 1, 16, 256; lengths 1, a page - 1, a page, a page + 1 and thousands in one batch;
                decoding (Sq = 1) and chunked prefill (Sq > 1, the last Sq tokens of every sequence); GQA, MQA, MHA;
                32768 blocks; the kernel variants' window, softcap and sinks (kernels.py); float32, bfloat16, float16
    reference   per sequence, the harness gathers that sequence's keys and values through the table itself (never
                the code under test) and runs transformers' functions on them (kernel_hf.forward: llama's, gemma2's,
                gpt_oss's eager functions, masking_utils' masks, the queries bottom-right aligned at
                cache_seqlens[b] - Sq + i), in the dtype and in float64; lse as the core matrix computes it
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.verify import kernel_hf
from harness.verify.diagnosis.evidence import maxdiff
from harness.verify.kernels import KEYWORDS, LSE_TOL, SINKS, sliding


class Keywords:
    """The contract's optional keywords a scenario passes (window, softcap, sinks), shared by paged and varlen."""

    window: tuple[int, int] | None
    softcap: float
    sinks: tuple[float, float] | None
    H: int
    seed: int

    def uses(self) -> tuple[str, ...]:
        used = {"window": self.window is not None, "softcap": bool(self.softcap), "sinks": self.sinks is not None}
        return tuple(k for k in KEYWORDS if used[k])

    def sink_logits(self) -> torch.Tensor | None:
        """float32 [H], distinct per head (seeded), or None."""
        if self.sinks is None:
            return None
        lo, hi = self.sinks
        return lo + (hi - lo) * torch.rand(self.H, generator=torch.Generator().manual_seed(self.seed + 7))


@dataclass(frozen=True)
class PagedScenario(Keywords):
    name: str
    isolates: str
    lens: tuple[int, ...]  # cache_seqlens: each sequence's length, its Sq new tokens included
    page: int = 16
    Sq: int = 1
    H: int = 8
    Hkv: int = 2
    d: int = 64
    causal: bool = True
    dtype: torch.dtype = torch.float32
    scale: float | None = None
    mult: float = 1.0  # q and k multiplied by this: scores grow by its square
    blocks: int | None = None  # num_blocks; None: the used ones plus SPARE times as many (at least MIN_SPARE)
    quick: bool = True
    seed: int = 0
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    sinks: tuple[float, float] | None = None


SPARE, MIN_SPARE = 3, 16  # unused blocks: 3x the used ones, at least 16
S = PagedScenario
BF16, FP16 = torch.bfloat16, torch.float16
SCENARIOS = [
    S("decode_p16_mixed", "decoding, page 16: lengths 1, 15, 16, 17 and 2000 in one batch, GQA g=4",
      lens=(1, 15, 16, 17, 2000)),
    S("decode_p1", "page size 1: every token a block of its own", page=1, lens=(1, 2, 3, 100, 700)),
    S("decode_p256_mqa", "page 256, MQA, head_dim 128: lengths 1, 255, 256, 257, 3000", page=256, H=4, Hkv=1, d=128,
      lens=(1, 255, 256, 257, 3000)),
    S("chunk_p16", "chunked prefill: the last 17 tokens, across a page boundary", Sq=17, lens=(17, 31, 32, 33, 1000)),
    S("chunk_p256", "chunked prefill, page 256: 40 new tokens across a page boundary", page=256, Sq=40,
      lens=(40, 255, 257, 600), quick=False),
    S("chunk_p1_mha", "MHA, head_dim 32, page 1, 5 new tokens, a given scale", page=1, H=4, Hkv=4, d=32, Sq=5,
      lens=(5, 6, 64), scale=0.3, quick=False),
    S("decode_32768_blocks", "32768 blocks (vLLM's index-overflow size), page 1, the last block used", page=1,
      blocks=32768, H=4, Hkv=1, lens=(1, 17, 1000), quick=False),
    S("noncausal_chunk", "causal=False: each new token sees every key of its sequence", Sq=8, causal=False,
      lens=(8, 20, 33), quick=False),
    S("window_decode", "sliding window 64 across pages: lengths 1, 63, 64, 65, 500", window=sliding(64),
      lens=(1, 63, 64, 65, 500)),
    S("window_chunk", "chunked prefill past window 32, page 16", Sq=17, window=sliding(32), lens=(17, 48, 300),
      quick=False),
    S("softcap_decode", "softcap 30, scores x50", softcap=30.0, mult=50**0.5, lens=(1, 17, 300), quick=False),
    S("sinks_decode", "sinks above the scores", sinks=SINKS["large"], lens=(1, 16, 300)),
    S("all_three_chunk", "window 64, softcap 30, scores x20, sinks, 5 new tokens, MQA head_dim 128", H=4, Hkv=1,
      d=128, Sq=5, window=sliding(64), softcap=30.0, mult=20**0.5, sinks=(15.0, 30.0), lens=(5, 70, 300),
      quick=False),
    S("bf16_decode", "bf16, decoding, page 16", dtype=BF16, lens=(1, 15, 16, 17, 300)),
    S("fp16_chunk", "fp16, chunked prefill", dtype=FP16, Sq=17, lens=(17, 33, 100), quick=False),
    S("bf16_all_three", "bf16, window 64, softcap 50, scores x25, sinks, decoding", dtype=BF16, window=sliding(64),
      softcap=50.0, mult=5.0, sinks=(20.0, 40.0), lens=(1, 65, 300), quick=False),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}
# Triton's interpreter runs a kernel in Python: on a CPU an interpreted kernel gets the quick set plus these (short
# pages, few tokens), to be re-measured once impl/paged_triton.py lands
INTERPRETER_EXTRA = {"fp16_chunk", "noncausal_chunk"}


def select(dtypes: set, quick: bool, slow_kernel: bool = False) -> list[PagedScenario]:
    return [s for s in SCENARIOS if s.dtype in dtypes and (s.quick or not quick)
            and (s.quick or not slow_kernel or s.name in INTERPRETER_EXTRA)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the cache and its table


def pages_of(lens, page: int) -> list[int]:
    return [math.ceil(n / page) for n in lens]


def scattered(pages: list[int], num_blocks: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_table [B, max(pages) + 1] int32, the blocks no sequence owns): each sequence's pages drawn at random,
    reshuffled until none is followed by its physical neighbour n + 1 and none is in increasing order; the cache's
    last block among them; the entries past a row's pages point at unowned blocks."""
    used = sum(pages)
    if used > num_blocks:
        raise ValueError(f"{used} pages do not fit in {num_blocks} blocks")
    order = torch.randperm(num_blocks, generator=g)
    chosen = order[:used].clone()
    if not (chosen == num_blocks - 1).any():
        chosen[int(torch.randint(used, (1,), generator=g))] = num_blocks - 1  # the cache's last block is used
    free = order[used:][order[used:] != num_blocks - 1]
    table = torch.empty(len(pages), max(pages) + 1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        mine = chosen[start : start + n]
        start += n
        for _ in range(100):
            if n < 2 or (not bool((mine[1:] == mine[:-1] + 1).any()) and not bool((mine[1:] > mine[:-1]).all())):
                break
            mine = mine[torch.randperm(n, generator=g)]
        table[b, :n] = mine
        rest = table.shape[1] - n
        table[b, n:] = free[torch.randint(len(free), (rest,), generator=g)] if len(free) else mine[:1].expand(rest)
    return table, free


@dataclass
class PagedInputs:
    q: torch.Tensor  # (B, H, Sq, d)
    k_cache: torch.Tensor  # (num_blocks, page, Hkv, d)
    v_cache: torch.Tensor
    block_table: torch.Tensor  # (B, max_blocks) int32
    cache_seqlens: torch.Tensor  # (B,) int32
    owned: torch.Tensor  # (num_blocks, page) bool: slots holding a sequence's token

    @property
    def page(self) -> int:
        return self.k_cache.shape[1]


def addresses(table: torch.Tensor, b: int, n: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, slots) of tokens 0 .. n - 1 of sequence b, as the contract places them."""
    t = torch.arange(n)
    return table[b, t // page].long(), t % page


def build(s, fill: str = "nan") -> PagedInputs:
    """A scenario's (or a probe's: any object with the scenario's fields) inputs, seeded. fill: what the slots no
    sequence owns hold: "nan" (the matrix), or "random" (finite values, distinct from every owned one: probes)."""
    g = torch.Generator().manual_seed(s.seed)
    B, P = len(s.lens), s.page
    pages = pages_of(s.lens, P)
    used = sum(pages)
    N = s.blocks or used + max(MIN_SPARE, SPARE * used)
    table, _ = scattered(pages, N, g)
    q = torch.randn(B, s.H, s.Sq, s.d, generator=g) * s.mult
    k_cache = torch.randn(N, P, s.Hkv, s.d, generator=g) * s.mult
    v_cache = torch.randn(N, P, s.Hkv, s.d, generator=g)
    owned = torch.zeros(N, P, dtype=torch.bool)
    for b, n in enumerate(s.lens):
        owned[addresses(table, b, n, P)] = True
    if fill == "nan":
        k_cache[~owned], v_cache[~owned] = float("nan"), float("nan")
    seqlens = torch.tensor(s.lens, dtype=torch.int32)
    dt = s.dtype
    return PagedInputs(q.to(dt), k_cache.to(dt), v_cache.to(dt), table, seqlens, owned)


def gather(x: PagedInputs, b: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) of sequence b, (1, Hkv, n, d), read through the table by the harness: its first n tokens (default:
    cache_seqlens[b]); past the sequence's length, whatever the table's entries point at."""
    n = int(x.cache_seqlens[b]) if n is None else n
    blocks, slots = addresses(x.block_table, b, n, x.page)
    return x.k_cache[blocks, slots].permute(1, 0, 2)[None], x.v_cache[blocks, slots].permute(1, 0, 2)[None]


# ---------------------------------------------------------------------------------------------------------
# reference


def scale_of(s) -> float:
    return s.d**-0.5 if s.scale is None else s.scale


@dataclass
class PagedCase:
    x: PagedInputs
    ref: torch.Tensor  # (B, H, Sq, d), the scenario's dtype
    ref64: torch.Tensor  # (B, H, Sq, d), float64
    lse64: torch.Tensor  # (B, H, Sq), the sink's term included
    keep: torch.Tensor  # (B, Sq) rows that see at least one key
    lse_tol: float
    sinks: torch.Tensor | None = None  # float32 [H]


def allowed(Sq: int, n: int, causal: bool, window, top_left: bool = False) -> torch.Tensor:
    """(1, 1, Sq, n) bool, as masking_utils builds it (kernel_hf.allowed): the queries at the last Sq positions, or
    with top_left at positions 0 .. Sq - 1 (a mistake the diagnosis simulates; n >= Sq)."""
    if not top_left:
        return kernel_hf.allowed(1, Sq, n, causal, window, None)
    keep4 = torch.zeros(1, 1, Sq, n, dtype=torch.bool)
    keep4[..., :Sq] = kernel_hf.allowed(1, Sq, Sq, causal, window, None)
    return keep4


def attend(q, k, v, s, sinks) -> tuple:
    """transformers on one sequence: q (1, H, Sq, d), k, v (1, Hkv, n, d) -> (out in the dtype, out float64, lse
    float64, lse as HF's scores in float32, keep (1, Sq))."""
    keep4 = allowed(q.shape[2], k.shape[2], s.causal, s.window)
    scale, cap = scale_of(s), s.softcap
    with torch.no_grad():
        ref = kernel_hf.forward(q, k, v, keep4, scale, cap, sinks)
        ref64 = kernel_hf.forward(q.double(), k.double(), v.double(), keep4, scale, cap, sinks, path="float64")
        lse64 = kernel_hf.lse(q, k, keep4, scale, cap, sinks)
        lse_hf = kernel_hf.lse(q, k, keep4, scale, cap, sinks, float64=False)
    return ref, ref64, lse64, lse_hf, keep4[:, 0].any(-1)


def half_lse_tol(dtype, lse_hf, lse64, keep) -> float:
    """kernels.py's rule: LSE_TOL in float32; in half precision 2x HF's own lse error + LSE_TOL."""
    if dtype == torch.float32:
        return LSE_TOL
    return LSE_TOL + 2 * maxdiff(lse_hf, lse64, keep[:, None, :].expand_as(lse64))


def reference(s: PagedScenario, cache: dict) -> PagedCase:
    if s.name in cache:
        return cache[s.name]
    x = build(s)
    sinks = s.sink_logits()
    parts = [attend(x.q[b : b + 1], *gather(x, b), s, sinks) for b in range(len(s.lens))]
    ref, ref64, lse64, lse_hf, keep = (torch.cat(t) for t in zip(*parts, strict=True))
    case = PagedCase(x, ref.contiguous(), ref64.contiguous(), lse64, keep,
                     half_lse_tol(s.dtype, lse_hf, lse64, keep), sinks)  # fmt: skip
    cache[s.name] = case
    return case


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, d) -> (B, Sq, H*d): the layout compare() reads, one row per query."""
    B, H, Sq, d = t.shape
    return t.transpose(1, 2).reshape(B, Sq, H * d)  # (B, Sq, H*d)


def lse_error(lse: torch.Tensor, c: PagedCase) -> float:
    return maxdiff(lse, c.lse64, c.keep[:, None, :].expand_as(lse))
