"""The serving contracts (issue 27): `--paged` (a KV cache in pages) and `--varlen` (packed sequences). The matrices
are built as the issue asks (shuffled tables, NaN in every unowned slot, the cache's last block used, mixed
lengths), the reference is transformers' on each sequence's own keys (checked against the contract's math written
here), reference kernels written from the contracts' text (tests/plugins/paged_ref.py) pass through `verify` in
their workers, the bugs written beside them fail with their stage, the probes find nothing in right kernels, and
bad input is one line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line_error, run

import impl
from harness.stages import STAGES
from harness.verify import contracts, paged_cases, varlen_cases
from harness.verify.diagnosis import paged as paged_diagnosis
from harness.verify.diagnosis import varlen as varlen_diagnosis
from harness.verify.diagnosis.serving import ServingRun
from harness.verify.run import DTYPES, builtin, verify

REF = "tests/plugins/paged_ref.py"
_spec = importlib.util.spec_from_file_location("paged_ref_inproc", Path(__file__).parent / "plugins" / "paged_ref.py")
pr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pr)
QUIET = {"log": lambda *_: None}
ALL = set(DTYPES.values())

# each bug of tests/plugins/paged_ref.py and the stage its verdict must name; what some hints must say (measured)
HINTS = {
    "seqlens_plus_one": ("probe:seqlens_plus_one", "reads one key past each sequence's end"),
    "table_ignored": ("probe:permute", "by their physical position"),
    "slot_wraps_early": ("probe:address_map", "tokens [15] are never read; tokens [0] weigh more"),
    "split_average": ("probe:split", "the sequence of 1 key gives its value"),
    "query_at_zero": ("probe:top_left", "the new query at position 0"),
    "cu_seqlens_off_by_one": ("probe:varlen_neighbours", "moves the output of sequence 0"),
}
BUGS = {
    "table_ignored": ("paged", "block_table"),
    "page_off_by_one": ("paged", "block_table"),
    "slot_wraps_early": ("paged", "block_table"),
    "boundary_next_page": ("paged", "block_table"),
    "seqlens_plus_one": ("paged", "seqlens"),
    "seqlens_minus_one": ("paged", "seqlens"),
    "seqlens_ignored": ("paged", "seqlens"),
    "split_no_rescale": ("paged", "split_merge"),
    "split_average": ("paged", "split_merge"),
    "query_at_zero": ("paged", "causal_mask"),
    "varlen_neighbour": ("varlen", "varlen_boundary"),
    "cu_seqlens_off_by_one": ("varlen", "varlen_boundary"),
}


@pytest.fixture(scope="module")
def refs():
    return {}


def judge(name: str, fn, contract: str, refs: dict, quick: bool = True):
    rows, (v,) = verify([], [builtin(name, fn, contract)], ALL, quick=quick, cache=refs, **QUIET)
    return rows, v


# ---------------------------------------------------------------------------------------------------------
# the matrices


def test_the_stages_exist():
    assert {"block_table", "seqlens", "split_merge", "varlen_boundary"} <= set(STAGES)


def test_paged_matrix_covers_the_issue():
    ss = paged_cases.SCENARIOS
    assert len({s.name for s in ss}) == len(ss)
    assert {s.page for s in ss} == {1, 16, 256}
    assert {s.dtype for s in ss} == ALL
    assert any(s.Sq == 1 for s in ss) and any(s.Sq > 1 for s in ss)
    assert any(s.Hkv == 1 for s in ss) and any(1 < s.Hkv < s.H for s in ss) and any(s.Hkv == s.H for s in ss)
    assert {k for s in ss for k in s.uses()} == {"window", "softcap", "sinks"}
    assert any(s.blocks == 32768 for s in ss)
    for p in (16, 256):  # lengths 1, a page - 1, a page, a page + 1 and thousands in one batch
        assert any({1, p - 1, p, p + 1} <= set(s.lens) and max(s.lens) >= 2000 for s in ss if s.page == p)
    quick = paged_cases.select(ALL, quick=True)
    assert 0 < len(quick) < len(ss) and {s.page for s in quick} == {1, 16, 256}


@pytest.mark.parametrize("s", [s for s in paged_cases.SCENARIOS if s.blocks is None], ids=lambda s: s.name)
def test_paged_cache_is_shuffled_and_poisoned(s):
    x = paged_cases.build(s)
    N, P = x.k_cache.shape[:2]
    pages = paged_cases.pages_of(s.lens, P)
    assert N >= 4 * sum(pages)  # many more blocks than the batch uses
    used = torch.cat([x.block_table[b, :n] for b, n in enumerate(pages)])
    assert len(set(used.tolist())) == len(used) and (used == N - 1).any()  # no block shared; the last one used
    for b, n in enumerate(pages):
        mine = x.block_table[b, :n]
        if n > 1:  # no page followed by its physical neighbour, not in increasing order
            assert not (mine[1:] == mine[:-1] + 1).any() and not (mine[1:] > mine[:-1]).all(), mine
        assert not set(x.block_table[b, n:].tolist()) & set(used.tolist())  # entries past it: unowned blocks
    # NaN exactly in the slots no sequence owns; each sequence's keys, gathered, are finite
    assert int(x.owned.sum()) == sum(s.lens)
    assert torch.isnan(x.k_cache[~x.owned]).all() and torch.isfinite(x.k_cache[x.owned]).all()
    for b, n in enumerate(s.lens):
        k, v = paged_cases.gather(x, b)
        assert k.shape == (1, s.Hkv, n, s.d) and torch.isfinite(k).all() and torch.isfinite(v).all()
        assert torch.isnan(paged_cases.gather(x, b, n + 1)[0][..., -1, :]).all()  # one past: an unowned slot


def test_varlen_matrix_covers_the_issue():
    ss = varlen_cases.SCENARIOS
    assert {s.dtype for s in ss} == ALL and {k for s in ss for k in s.uses()} == {"window", "softcap", "sinks"}
    assert any(q < k for s in ss for q, k in zip(s.lens_q, s.ks, strict=True)) and any(1 in s.lens_q for s in ss)
    assert any(not s.causal for s in ss) and all(q <= k for s in ss for q, k in zip(s.lens_q, s.ks, strict=True))
    x = varlen_cases.build(varlen_cases.BY_NAME["q_shorter"])
    assert x.cu_q.dtype == torch.int32 and x.cu_q.tolist() == [0, 1, 6, 23, 24] and x.max_k == 300


def formula(q, k, v, s, sinks):
    """The contract's math in float64, written here: query i at position n - Sq + i, window, softcap, sinks."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    Sq, n = q.shape[2], k.shape[2]
    sc = (q @ k.transpose(-2, -1)) * (s.scale or s.d**-0.5)
    if s.softcap:
        sc = s.softcap * torch.tanh(sc / s.softcap)
    p, j = torch.arange(Sq)[:, None] + n - Sq, torch.arange(n)[None, :]
    keep = (j <= p) if s.causal else torch.ones(Sq, n, dtype=torch.bool)
    if s.window is not None:
        keep = keep & (j >= p - s.window[0])
    sc = sc.masked_fill(~keep, -math.inf)
    if sinks is not None:
        sc = torch.cat([sc, sinks.double().view(1, -1, 1, 1).expand(*sc.shape[:3], 1)], -1)
    return (torch.softmax(sc, -1)[..., :n] @ v), torch.logsumexp(sc, -1)


@pytest.mark.parametrize("name", ["decode_p16_mixed", "chunk_p1_mha", "all_three_chunk", "noncausal_chunk"])
def test_paged_reference_is_the_contracts_math(name, refs):
    s = paged_cases.BY_NAME[name]
    c = paged_cases.reference(s, refs.setdefault("paged", {}))
    for b in range(len(s.lens)):
        out, lse = formula(c.x.q[b : b + 1], *paged_cases.gather(c.x, b), s, c.sinks)
        assert (out[0] - c.ref64[b]).abs().max() < 1e-10 and (lse[0] - c.lse64[b]).abs().max() < 1e-10


def test_varlen_reference_is_the_contracts_math(refs):
    s = varlen_cases.BY_NAME["sinks"]
    c = varlen_cases.reference(s, refs.setdefault("varlen", {}))
    for b in range(len(s.lens_q)):
        out, lse = formula(*varlen_cases.sequence(c.x, b), s, c.sinks)
        rows = slice(int(c.x.cu_q[b]), int(c.x.cu_q[b + 1]))
        assert (varlen_cases.packed(out) - c.ref64[rows]).abs().max() < 1e-10
        assert (lse[0] - c.lse64[:, rows]).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------------------
# through verify


def test_reference_kernels_pass_in_their_workers(tmp_path):
    """Through the command line, each in its worker: the reference kernels pass, a bug fails with its stage, an
    output of the wrong shape is a contract fault."""
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", "--quick", "--paged", f"{REF}:attn", "--varlen", f"{REF}:varlen",
             "--paged", f"{REF}:seqlens_ignored", "--paged", f"{REF}:wrong_shape", "--json", str(out)])  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    doc = json.loads(out.read_text())
    v = {x["impl"]: x for x in doc["verdicts"]}
    for spec in ("attn", "varlen"):
        assert v[f"{REF}:{spec}"]["passed"] and not v[f"{REF}:{spec}"]["skipped"], v[f"{REF}:{spec}"]
    bug = v[f"{REF}:seqlens_ignored"]
    assert not bug["passed"] and bug["stage"] == "seqlens", bug
    shape = v[f"{REF}:wrong_shape"]
    assert shape["stage"] == "contract" and "[5, 8, 1, 63]" in shape["hint"] and "[5, 8, 1, 64]" in shape["hint"]
    rows = doc["results"]
    assert {r["fixture"] for r in rows} == {"paged", "varlen"}
    assert {r["check"] for r in rows if r["impl"] == f"{REF}:attn"} == {"forward", "lse"}
    # a keyword its signature lacks: that scenario skipped, never a pass
    skipped = {r["scenario"] for r in rows if r["impl"] == f"{REF}:seqlens_ignored" and r["skipped"]}
    assert skipped == {s.name for s in paged_cases.select(ALL, True) if s.uses()}, skipped


@pytest.mark.gate  # real models / full matrices: a CI gate, out of make test's budget
def test_reference_kernels_pass_the_full_matrices(refs):
    for name, fn, contract in (("attn", pr.attn, "paged"), ("split", pr.split, "paged"), ("varlen", pr.varlen,
                                                                                           "varlen")):  # fmt: skip
        rows, v = judge(name, fn, contract, refs, quick=False)
        assert v.passed and not v.skipped and len(rows) > 20, (name, v)


@pytest.mark.parametrize("name", list(BUGS))
def test_bugs_fail_with_their_stage(name, refs):
    contract, stage = BUGS[name]
    rows, v = judge(name, getattr(pr, name), contract, refs)
    assert not v.passed and v.stage == stage, (v.stage, v.matched, v.hint)
    assert any(not r.passed and r.skipped is None for r in rows)
    if name in HINTS:
        assert v.matched == HINTS[name][0] and HINTS[name][1] in v.hint, (v.matched, v.hint)


def whole_last_page(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    """Every slot of a sequence's last page read, its length rounded up to the page: no length variant, no address
    explains it; the address map sees weight past the length."""
    P = k_cache.shape[1]
    return pr.paged_with(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, None, 0.0, None,
                         length=lambda n, lens: -(-n // P) * P)  # fmt: skip


def masks_by_zero(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None):
    """The whole last page loaded, the scores past the length masked: right on finite caches, NaN on the matrix's
    (weight 0 x a NaN value is NaN)."""
    P, (_, H, Sq, d), outs = k_cache.shape[1], q.shape, []
    for b, n in enumerate(cache_seqlens.tolist()):
        k, v = pr.gather(k_cache, v_cache, block_table, b, -(-n // P) * P)  # (1, Hkv, pages * P, d)
        k, v = (t.float().repeat_interleave(H // t.shape[1], 1) for t in (k, v))  # (1, H, pages * P, d)
        s = (q[b : b + 1].float() @ k.transpose(-2, -1)) * (d**-0.5 if scale is None else scale)
        j, p = torch.arange(k.shape[2]), torch.arange(Sq)[:, None] + n - Sq
        keep = (j < n) & ((j <= p) if causal else True)
        outs.append(torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v)
    return torch.cat(outs).to(q.dtype)


def no_scale(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
             sinks=None):  # fmt: skip
    return pr.attn(q, k_cache, v_cache, block_table=block_table, cache_seqlens=cache_seqlens, causal=causal,
                   scale=1.0 if scale is None else scale, window=window, softcap=softcap, sinks=sinks)  # fmt: skip


def varlen_no_window(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None,
                     window=None, softcap=0.0, sinks=None):  # fmt: skip
    return pr.varlen(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                     max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, softcap=softcap, sinks=sinks)  # fmt: skip


@pytest.mark.parametrize("fn, contract, stage, matched", [
    (whole_last_page, "paged", "seqlens", "probe:address_map_long"),
    (masks_by_zero, "paged", "seqlens", "probe:nan_seqlens"),
    (no_scale, "paged", "scale", "as_core:"),
    (varlen_no_window, "varlen", "sliding_window", "as_core:probe:window"),
], ids=["reads_past", "masks_by_zero", "no_scale", "varlen_no_window"])  # fmt: skip
def test_bugs_in_no_list_named_from_what_is_measured(fn, contract, stage, matched, refs):
    _, v = judge(fn.__name__, fn, contract, refs)
    assert not v.passed and v.stage == stage and v.matched.startswith(matched), (v.stage, v.matched, v.hint)


# ---------------------------------------------------------------------------------------------------------
# the probes are quiet on right kernels


def _runs(cases, names):
    return {n: ServingRun(cases.BY_NAME[n], None, torch.zeros(1), None) for n in names}


@pytest.mark.parametrize("fn, batches", [
    (pr.attn, (["decode_p16_mixed"], ["chunk_p16"])),
    (pr.split, (["decode_p16_mixed"],)),
], ids=["attn", "split"])  # fmt: skip
def test_paged_probes_find_nothing_in_right_kernels(fn, batches):
    def call(x, **kw):
        return fn(x.q, x.k_cache, x.v_cache, block_table=x.block_table, cache_seqlens=x.cache_seqlens, **kw)

    for names in batches:
        runs = _runs(paged_cases, names)
        assert paged_diagnosis.probe_paged(runs, names, call) is None
        s = paged_diagnosis.probe_scenario(runs, names)
        x = paged_cases.build(s, fill="random")
        out, _ = call(x, causal=True, scale=None)
        right = paged_diagnosis.truth(x, s)
        for probe in (paged_diagnosis.permute_probe, paged_diagnosis.neighbours_probe, paged_diagnosis.nan_probe,
                      paged_diagnosis.address_map_probe):
            assert probe(x, out, call, s) is None, probe
        assert paged_diagnosis.lengths_probe(x, out, call, s, right) is None
        assert paged_diagnosis.addresses_probe(x, out, call, s, right) is None
        assert paged_diagnosis.split_probe(call, s) is None


def test_varlen_probes_find_nothing_in_a_right_kernel():
    def call(x, **kw):
        return pr.varlen(x.q, x.k, x.v, cu_seqlens_q=x.cu_q, cu_seqlens_k=x.cu_k, max_seqlen_q=x.max_q,
                         max_seqlen_k=x.max_k, **kw)  # fmt: skip

    runs = _runs(varlen_cases, ["packed_mixed"])
    assert varlen_diagnosis.probe_varlen(runs, ["packed_mixed"], call) is None
    s = varlen_diagnosis.probe_scenario(runs, ["packed_mixed"])
    x = varlen_cases.build(s)
    out, _ = call(x, causal=True, scale=None)
    assert varlen_diagnosis.neighbours_probe(x, out, call, s) is None
    assert varlen_diagnosis.lengths_probe(x, out, call, s, varlen_diagnosis.truth(x, s)) is None


# ---------------------------------------------------------------------------------------------------------
# faults and bad input


def test_builtins_come_from_impl(monkeypatch):
    """impl.PAGED and impl.VARLEN name the built-ins; a run with no contract option runs every contract's built-ins
    (run.py), so `make verify` runs them as it runs the cores."""
    assert {"paged", "varlen"} <= {c.NAME for c in contracts.with_options()}
    monkeypatch.setattr(impl, "PAGED", {"ref": pr.attn}, raising=False)
    monkeypatch.setattr(impl, "VARLEN", {"ref_varlen": pr.varlen}, raising=False)
    assert contracts.get("paged").builtins() == {"ref": pr.attn}
    assert contracts.get("varlen").builtins() == {"ref_varlen": pr.varlen}
    p = run(["-m", "harness", "verify", "--quick", "--paged", "ref", "--varlen", "ref_varlen", "--dtype", "float32"])
    assert p.returncode == 0 and "paged" in p.stdout and "varlen" in p.stdout, p.stdout[-2000:] + p.stderr


@pytest.mark.parametrize("args, says", [
    (["--paged", "nosuch"], "unknown implementation 'nosuch' for the paged contract"),
    (["--varlen", "nosuch"], "unknown implementation 'nosuch' for the varlen contract"),
    (["--paged", "tests/plugins/no_such_file.py:attn"], "no such file"),
])  # fmt: skip
def test_a_spec_that_does_not_exist_is_one_line(args, says):
    p = run(["-m", "harness", "verify", "--quick", *args])
    assert p.returncode == 2 and says in one_line_error(p), p.stderr


@pytest.mark.gate  # a pytest run in a subprocess with a worker (CI gate: out of make test's budget)
def test_the_pytest_plugin_takes_paged_entries(tmp_path):
    """`--attention-paged SPEC`: an item per scenario and check, the bug's failing items naming its stage."""
    shutil.copy(ROOT / REF, tmp_path / "paged_ref.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "COLUMNS": "250"}
    args = ["--attention-paged", "paged_ref.py:seqlens_ignored", "--attention-quick", "--attention-dtype", "float32"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
                        *args, "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert "attention-verify::paged::paged_ref.py:seqlens_ignored::decode_p16_mixed::forward" in p.stdout
    assert "stage seqlens" in p.stdout, p.stdout[-3000:]
