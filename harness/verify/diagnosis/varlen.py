"""The first diagnosis of a packed variable-length kernel (`--varlen`): probes that ask the kernel directly, on a
packed batch of the diagnosis's own (float32; sequences of 1, 5, 16, 17 and 3 queries against 1, 40, 16, 33 and 3
keys: decoding, chunked prefill, prefill, a sequence of one token).

    plain       the probe batch answered right: the failure is elsewhere: serving.py goes on (the kernel asked as a
                --core kernel, then the pattern)
    neighbours  one sequence's queries, keys and values changed: no other sequence's rows may move; if one does,
                a sequence sees its neighbour (or reads the offsets off by one): varlen_boundary
    lengths     transformers on each sequence's keys one short or one long (the next sequence's first key), and on
                the queries at positions 0 .. len_q - 1: matched, varlen_boundary (causal_mask for the last)
    edges       only each sequence's first or only its last query row wrong: the offsets read off by one
"""

from __future__ import annotations

from dataclasses import replace

import torch

from harness.verify import kernel_hf
from harness.verify.diagnosis import serving
from harness.verify.diagnosis.evidence import Diagnosis
from harness.verify.diagnosis.serving import GATE, ask, matches, moved, seq_err
from harness.verify.paged_cases import allowed, scale_of
from harness.verify.varlen_cases import VarlenInputs, VarlenScenario, build, offsets, packed, sequence


def probe_scenario(runs: dict, failing: list[str]) -> VarlenScenario:
    causal = any(runs[n].s.causal for n in failing)
    return VarlenScenario("probe", "the diagnosis's batch", lens_q=(1, 5, 16, 17, 3), lens_k=(1, 40, 16, 33, 3),
                          H=4, Hkv=2, d=32, causal=causal, seed=11)  # fmt: skip


def rows(x: VarlenInputs, b: int) -> slice:
    return slice(int(x.cu_q[b]), int(x.cu_q[b + 1]))


def truth(x: VarlenInputs, s: VarlenScenario, extend: int = 0, top_left: bool = False) -> list[torch.Tensor | None]:
    """transformers in float64 per sequence (len_q, H, d); extend: each sequence's key range made longer (1: into
    the next sequence's first key) or shorter (-1); None where that leaves fewer keys than queries or runs off the
    packed keys."""
    out = []
    for b in range(len(x.cu_q) - 1):
        q, _, _ = sequence(x, b)
        lo, hi = int(x.cu_k[b]), int(x.cu_k[b + 1]) + extend
        n, Sq = hi - lo, q.shape[2]
        if n < max(Sq, 1) or hi > x.k.shape[0]:
            out.append(None)
            continue
        k, v = (t[lo:hi].transpose(0, 1)[None].double() for t in (x.k, x.v))  # (1, Hkv, n, d)
        keep4 = allowed(Sq, n, s.causal, None, top_left)
        ref = kernel_hf.forward(q.double(), k, v, keep4, scale_of(s), path="float64")
        out.append(packed(ref))
    return out


def per_sequence(x: VarlenInputs, out: torch.Tensor) -> list[torch.Tensor]:
    return [out[rows(x, b)] for b in range(len(x.cu_q) - 1)]


def changed(x: VarlenInputs, b0: int, seed: int = 5) -> VarlenInputs:
    """Sequence b0's queries, keys and values drawn anew; nothing else touched."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = x.q.clone(), x.k.clone(), x.v.clone()
    ks = slice(int(x.cu_k[b0]), int(x.cu_k[b0 + 1]))
    q[rows(x, b0)] = torch.randn(q[rows(x, b0)].shape, generator=g).to(q.dtype)
    k[ks] = torch.randn(k[ks].shape, generator=g).to(k.dtype)
    v[ks] = torch.randn(v[ks].shape, generator=g).to(v.dtype)
    return replace(x, q=q, k=k, v=v)


def neighbours_probe(x, out, call, s) -> Diagnosis | None:
    B = len(x.cu_q) - 1
    lens = (x.cu_k[1:] - x.cu_k[:-1]).tolist()
    for b0 in range(B):
        out2, _ = call(changed(x, b0), causal=s.causal, scale=None)
        hit = [b for b in range(B) if b != b0 and moved(out[rows(x, b)], out2[rows(x, b)])]
        if hit:
            return Diagnosis("varlen_boundary", f"changing only sequence {b0}'s queries, keys and values moves the "
                             f"output of sequence {hit[0]} (key lengths {lens}): a sequence sees tokens of another; "
                             "sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and "
                             "cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v", "probe:varlen_neighbours")  # fmt: skip
    return None


def lengths_probe(x, out, call, s, right) -> Diagnosis | None:
    got = per_sequence(x, out)
    for extend, what in ((-1, "one short (its last key missed)"), (1, "one long (the next sequence's first key)")):
        if matches(got, truth(x, s, extend=extend), right):
            return Diagnosis("varlen_boundary", f"the output is transformers' with each sequence's keys {what}: the "
                             "key range of sequence b is cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1",
                             f"probe:varlen_keys_{'long' if extend > 0 else 'short'}")  # fmt: skip
    if s.causal and matches(got, truth(x, s, top_left=True), right):
        return Diagnosis("causal_mask", "the output is transformers' with each sequence's queries at positions "
                         "0 .. len_q - 1: they are its last len_q tokens, query i at len_k - len_q + i "
                         "(bottom-right)", "probe:top_left")  # fmt: skip
    return None


def edges_probe(x, out, right) -> Diagnosis | None:
    """Only the first or only the last query row of sequences wrong, every other row right: the offsets read off by
    one (an end taken as inclusive drops each sequence's last token; a start one late its first)."""
    got = per_sequence(x, out)
    bad = [[i for i in range(len(w)) if float((g[i].double() - w[i]).abs().max()) > GATE]
           for g, w in zip(got, right, strict=True)]  # fmt: skip
    if not any(bad):
        return None
    for edge, at in (("last", lambda n: n - 1), ("first", lambda n: 0)):
        if all(rows_bad in ([], [at(len(w))]) for rows_bad, w in zip(bad, right, strict=True)):
            which = [b for b, r in enumerate(bad) if r]
            return Diagnosis("varlen_boundary", f"only the {edge} query row of sequences {which} is wrong, every "
                             "other row right: the packed offsets look read off by one; sequence b is rows "
                             "cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (the end exclusive)",
                             f"probe:varlen_{edge}_row")  # fmt: skip
    return None


def probe_varlen(runs: dict, failing: list[str], call) -> Diagnosis | None:
    """The probes in order on the probe batch; None when it is answered right or no probe names the failure."""
    s = probe_scenario(runs, failing)
    x = build(s)
    out, _ = call(x, causal=s.causal, scale=None)
    right = truth(x, s)
    if max(seq_err(per_sequence(x, out), right)) <= GATE:
        return None
    for probe in (lambda: neighbours_probe(x, out, call, s), lambda: lengths_probe(x, out, call, s, right),
                  lambda: edges_probe(x, out, right)):
        found = ask(probe)
        if found is not None:
            return found
    return None


def as_core(call):
    """A varlen kernel asked as a --core kernel (dense q, k, v, B sequences of equal lengths; no padding mask)."""

    def core_call(q, k, v, *, causal=True, scale=None, mask=None, **kw):
        if mask is not None:
            raise ValueError("the varlen contract has no padding mask")
        B, H, Sq, d = q.shape
        Sk = k.shape[2]
        # (B, heads, S, d) -> (B*S, heads, d): the batch packed, every sequence S long
        x = VarlenInputs(q.transpose(1, 2).reshape(B * Sq, H, d), k.transpose(1, 2).reshape(B * Sk, -1, d),
                         v.transpose(1, 2).reshape(B * Sk, -1, d), offsets([Sq] * B), offsets([Sk] * B))
        out, lse = call(x, causal=causal, scale=scale, **kw)
        out = out.reshape(B, Sq, H, d).transpose(1, 2)  # (B, H, Sq, d)
        return out, None if lse is None else lse.reshape(H, B, Sq).transpose(0, 1)  # (B, H, Sq)

    return core_call


def diagnose_varlen(runs: dict, failing: list[str], passing: list[str], call, cache: dict) -> Diagnosis:
    """call(x, causal=, scale=[, window=, softcap=, sinks=]) -> (out, lse or None) runs the kernel; cache: the core
    matrix's references (serving.as_core)."""
    return serving.diagnose(runs, failing, passing, lambda f: probe_varlen(runs, f, call), as_core(call), cache,
                            paged=False)  # fmt: skip
