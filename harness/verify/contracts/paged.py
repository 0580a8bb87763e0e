"""The paged KV-cache contract (`--paged`): attention for a few new tokens per sequence against a cache held in pages
(vLLM, FlashInfer, FlashAttention's flash_attn_with_kvcache).

    attn(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
         sinks=None) -> out or (out, lse)
    q [B, H, Sq, d]: the last Sq tokens of each sequence (Sq = 1 decoding, > 1 chunked prefill); k_cache, v_cache
    [num_blocks, page_size, Hkv, d], already holding those tokens; block_table [B, max_blocks] int32: token t of
    sequence b at block block_table[b, t // page_size], slot t % page_size; cache_seqlens [B] int32: each sequence's
    length, its new tokens included; query i of sequence b at position cache_seqlens[b] - Sq + i (bottom-right, as
    --core); entries past a sequence's length are arbitrary and every slot no sequence owns holds NaN. window,
    softcap, sinks as --core; out [B, H, Sq, d] in q's dtype, lse [B, H, Sq] float32 (sink included)

    the call    window, softcap and sinks passed only when the scenario uses them; a scenario using a keyword the
                kernel's signature lacks is skipped (core.py's rule)
    cases       paged_cases.py, one target of its own
    reference   per sequence, gathered by the harness, transformers' functions (kernel_hf.py) in the dtype and float64
    compared    out [B, Sq, H*d] (compare.py: NaN anywhere fails); lse within paged_cases' tolerance of float64
    diagnosis   diagnosis/paged.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import impl as builtin_impls
from harness.verify import paged_cases
from harness.verify import serve as serve_fns
from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.compare import within
from harness.verify.contracts import core
from harness.verify.diagnosis import paged as diagnosis
from harness.verify.diagnosis.serving import ServingRun

NAME = "paged"
OPTION = "--paged"
HELP = ("paged KV-cache kernels: built-in names or module:function, attn(q, k_cache, v_cache, *, block_table, "
        "cache_seqlens, causal=True, scale=None, window=None, softcap=0.0, sinks=None) -> out or (out, lse); a "
        "scenario using a keyword the signature lacks is skipped")
GRAD = None
FAULT_CHECK = "forward"
SERVE = "harness.verify.serve:paged"
serve = serve_fns.paged


@dataclass(frozen=True)
class Matrix:
    """The paged matrix as a target: the rows' fixture column says `paged`."""

    name: str = "paged"


PAGED = Matrix()
THIS = sys.modules[__name__]


def builtins() -> dict:
    # impl.PAGED: the built-in paged kernels (impl/paged.py, impl/paged_triton.py); none on a tree without them
    return dict(getattr(builtin_impls, "PAGED", {}))


def targets(fixtures) -> list[Matrix]:
    return [PAGED]


def cases(target, ctx, impl) -> list:
    return paged_cases.select(ctx.dtypes, ctx.quick, slow_kernel=bool(impl is not None and impl.interpreted))


def reference(target, s, ctx, device="cpu") -> paged_cases.PagedCase:
    return paged_cases.reference(s, ctx.cache.setdefault(PAGED.name, {}))


def run_paged(impl, x: paged_cases.PagedInputs, *, causal=True, scale=None, window=None, softcap=0.0, sinks=None):
    """-> (out, lse or None), checked against the contract (the diagnosis's probes call it too)."""
    extra, more = core.features(window, softcap, sinks)
    t = {"q": x.q, "k_cache": x.k_cache, "v_cache": x.v_cache, "block_table": x.block_table,
         "cache_seqlens": x.cache_seqlens} | more  # fmt: skip
    descs, items = impl.call(THIS, {"causal": causal, "scale": scale} | extra, t, "running the paged kernel",
                             expect=x.q.numel() + x.q[..., 0].numel())  # out and lse  # fmt: skip
    return core.check_output(descs, items, x.q, impl.device)


def call(impl, target, s, c: paged_cases.PagedCase):
    return run_paged(impl, c.x, causal=s.causal, scale=s.scale, **core.keywords(s, c))


def unsupported(target, s, impl) -> str | None:
    return core.unsupported(target, s, impl)


def not_run(s, c: paged_cases.PagedCase):
    return no_output(c.ref, s.dtype)


def compare(target, s, c: paged_cases.PagedCase, got) -> list:
    out, lse = got
    rows = paged_cases.rows_of
    checks = [("forward", compare_tensors(rows(out), rows(c.ref), rows(c.ref64), c.keep, s.dtype))]
    if lse is not None:
        checks.append(("lse", within(paged_cases.lse_error(lse, c), c.lse_tol, lse_rule(s.dtype))))
    return checks


def lse_rule(dtype) -> str:
    return "|lse-lse64|<=1e-3" if dtype == torch.float32 else "|lse-lse64|<=2x|HF-lse64|+1e-3"


def evidence(target, s, c: paged_cases.PagedCase, got) -> ServingRun:
    out, lse = got
    return ServingRun(s, c, out, None if lse is None else paged_cases.lse_error(lse, c))


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    failing = [n if ch == "forward" else f"{n}:{ch}" for n, checks in failed.items() for ch in checks]
    return diagnosis.diagnose_paged(runs, failing, passing, lambda x, **kw: run_paged(impl, x, **kw),
                                 ctx.cache.setdefault(core.KERNELS.name, {}))  # the core matrix's references
