"""The verdict of `e2e --paged` (paged.py): the first step whose logits leave the bound, the first layer whose
attention output differs from transformers' at that step, and what differs.

    step    paged.Judge: the first step (prefill, or decode step t) at which some sequence's logits leave the bound
            (or its token differs from generate's while its logits stay within it: a near tie, no layer to name)
    layer   transformers' own model, unmodified, re-run over each failing sequence's tokens up to that step (eager,
            one sequence at a time, no padding, no cache), every layer's self_attn output caught by a forward hook
            (prefill: every prompt position; a decode step: its new token), against the paged run's at that step:
            the first layer off by more than LAYER_RTOL of its scale. Layers before it computed the same inputs, so
            it is where the kernel first answers wrong (a kernel wrong everywhere: layer 0)
    what    the paged diagnosis's probes (verify/diagnosis/paged.py: the pages and the table permuted together,
            lengths, neighbours, addresses, the address map, NaN, the split merge) ask the kernel itself, on a batch
            of the diagnosis's own with the run's page size and new-token count; with where the failing sequences'
            new tokens sat in their pages
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.e2e.paged import PagedResult
from harness.verify.contracts.paged import run_paged
from harness.verify.diagnosis.paged import probe_paged
from harness.verify.diagnosis.serving import ServingRun
from harness.verify.paged_cases import PagedScenario
from harness.verify.plugins import Impl

# Of the scale of transformers' attention output at that layer (max |.| over the compared rows), as compare.py's
# float32 promise: at a passing run's last step every layer is within 4e-6 of it on SmolLM2 and Gemma 3, 1.7e-5 on
# Gemma 3 with an 8-key window (docs/e2e.md); the catalog's paged bugs move layer 0 by 0.09 of it or more.
LAYER_RTOL = 1e-3


@dataclass
class Verdict:
    text: str  # "prefill matches; step 3, layer 0: ..." or "prefill and all N decode steps match"
    step: int | None  # 0: prefill; t: decode step t; None: every step matches
    layer: int | None
    layer_rel_errs: list[float]  # at that step (passing: the last), per layer: max |paged - HF| / max |HF|
    stage: str | None = None  # the probe's stage (harness/stages.py), where one named the failure
    hint: str | None = None


def where(step: int, n: int) -> str:
    return "prefill" if step == 0 else f"step {step} (token {step + 1} of {n})"


@torch.inference_mode()
def reference_layers(model, ids: torch.Tensor, last_only: bool) -> list[torch.Tensor]:
    """transformers' self_attn output of every layer over one sequence ids (S,): (S, D) each, or its last row (1, D)."""
    caught: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out, i=i: caught.__setitem__(i, out[0][0]))
             for i, layer in enumerate(model.layers)]  # fmt: skip
    try:
        model.lm(input_ids=ids[None].to(model.lm.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [caught[i][-1:] if last_only else caught[i] for i in range(len(model.layers))]  # (rows, D) each


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, NaN counted as infinite."""
    d = torch.nan_to_num((got.double() - ref.double()).abs(), nan=float("inf"))
    return float(d.max()) / max(float(ref.abs().max()), 1e-30)


def layer_errors(model, result: PagedResult, evidence: dict) -> tuple[list[float], list[list[int]]]:
    """At the step the evidence is of, per layer: the largest relative error over the sequences compared there (their
    tokens so far transformers'), and the sequences off by more than LAYER_RTOL."""
    j, t = result.judge, evidence["step"]
    seqs = [b for b in range(len(result.rows)) if j.differ[b] is None or j.differ[b] >= t]
    errs = [[0.0] * len(result.rows) for _ in model.layers]
    for b in seqs:
        ids = torch.cat((result.rows[b].cpu(), result.tokens[b, :t].cpu()))  # the inputs of step t: (S_b + t,)
        for i, ref in enumerate(reference_layers(model, ids, last_only=t > 0)):
            errs[i][b] = rel_err(evidence["outputs"][i][b], ref)
    return [max(e) for e in errs], [[b for b in seqs if e[b] > LAYER_RTOL] for e in errs]


def probe(impl: Impl, page: int, sq: int, out: torch.Tensor):
    """The paged diagnosis's probes on the kernel (a Diagnosis), or None when none names it or it cannot answer."""
    s = PagedScenario("e2e", "the failing step of e2e --paged", lens=(sq,), page=page, Sq=sq)
    try:
        return probe_paged({"e2e": ServingRun(s, None, out[None], None)}, ["e2e"],
                           lambda x, **kw: run_paged(impl, x, **kw))  # fmt: skip
    except Exception:  # noqa: BLE001 - a kernel that cannot answer the probes decides nothing
        return None


def placed(lens: list[int], seqs: list[int], page: int, step: int, rows: list[torch.Tensor]) -> str:
    """Where the failing sequences' new tokens sat: their lengths and, decoding, the new token's page and slot."""
    if step == 0:
        return ", ".join(f"{b} ({len(rows[b])} tokens)" for b in seqs)
    return ", ".join(f"{b} (length {lens[b]}: its new token in slot {(lens[b] - 1) % page} of page "
                     f"{(lens[b] - 1) // page})" for b in seqs)  # fmt: skip


def verdict(model, impl: Impl, result: PagedResult) -> Verdict:
    j, n = result.judge, result.decode_steps + 1
    if j.bad is None:  # the layers' float32 noise at the last step, for the record
        rels, _ = layer_errors(model, result, j.last)
        return Verdict(f"prefill and all {result.decode_steps} decode steps match; at the last step every layer's "
                       f"attention output is within {max(rels):.1e} of transformers' (bound {LAYER_RTOL:g})", None,
                       None, rels)  # fmt: skip
    t = j.bad
    head = ("" if t == 0 else "prefill matches; ") + where(t, n)
    if not j.logit_fail:
        b = j.bad_seqs[0]
        return Verdict(f"{head}: sequence {b}'s token differs from transformers' while every logit stays within the "
                       "bound (a near tie)", t, None, [])  # fmt: skip
    rels, off = layer_errors(model, result, j.evidence)
    first = next((i for i, r in enumerate(rels) if r > LAYER_RTOL), None)
    layer = first if first is not None else max(range(len(rels)), key=rels.__getitem__)
    seqs = off[layer] or j.bad_seqs
    out = j.evidence["kernel_out"][layer][seqs[0]]  # (H, Sq, d)
    nan = any(not torch.isfinite(j.evidence["kernel_out"][layer][b]).all() for b in seqs)
    off_by = "not finite (transformers' is)" if math.isinf(rels[layer]) else \
        f"{rels[layer]:.2g} of its scale off transformers'"
    facts = (f"the attention output is {off_by} for sequence(s) "
             f"{placed(j.evidence['lens'], seqs, result.page_size, t, result.rows)}, page size {result.page_size}"
             + ("; the kernel's output holds NaN (every slot no sequence owns is NaN)" if nan else ""))
    if first is None:
        facts += f"; no layer is off by more than {LAYER_RTOL:g}, this one the most"
    found = probe(impl, result.page_size, out.shape[1], out)
    if found is None and out.shape[1] > 1:  # most probes are written for decoding: ask again with one new token
        found = probe(impl, result.page_size, 1, out[:, -1:])
    hint = found.hint if found is not None else "no probe of the paged diagnosis names it"
    text = f"{head}, layer {layer}: {facts}; asked directly (on the diagnosis's own batch): {hint}" \
        + (f" [{found.stage}]" if found is not None else "")
    return Verdict(text, t, layer, rels, found.stage if found is not None else None, hint)
