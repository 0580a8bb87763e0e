"""The kernel contract's window, softcap and sinks (issue 25): the reference is right (against the contract's math in
float64, written here, and against its own limits), the scenarios bind, the call passes a keyword only when a
scenario uses it, a kernel whose signature lacks one skips those scenarios (never a pass), transformers' own
functions wrapped as plug-ins (tests/plugins/hf_kernels.py) pass, and the sinks' gradient is checked."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import run
from transformers import MistralConfig
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.gemma2 import modeling_gemma2

from harness.verify import ci_output, grads, kernel_hf, kernels, report
from harness.verify.compare import compare, skipped
from harness.verify.contracts import core
from harness.verify.records import Row, Verdict
from harness.verify.run import DTYPES, builtin, verify
from harness.verify.worker import accepts, claimed_signature, signature_of

PLUGINS = Path(__file__).parent / "plugins" / "hf_kernels.py"
HF = "tests/plugins/hf_kernels.py"
_spec = importlib.util.spec_from_file_location("hf_kernels_inproc", PLUGINS)
hf_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_kernels)

# by design equal to plain causal: the window does not bind at that length (or is unbounded)
EQUALS_CAUSAL = {"window_64_len63", "window_64_len64", "window_past_seq", "window_full_causal", "window_unbounded"}


# ---------------------------------------------------------------------------------------------------------
# the contract's math, straight from the spec, float64 (the test's own; the harness uses transformers' functions)


def formula_keep(Sq, Sk, causal, window, mask, B):
    p = torch.arange(Sq)[:, None] + (Sk - Sq)
    j = torch.arange(Sk)[None, :]
    keep = (j <= p) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    left, right = window if window is not None else (-1, -1)
    if left >= 0:
        keep = keep & (p - left <= j)
    if right >= 0:
        keep = keep & (j <= p + right)
    keep = keep[None, None].expand(B, 1, Sq, Sk)
    return keep & mask.bool()[:, None, None, :] if mask is not None else keep


def formula(q, k, v, keep, scale, softcap, sinks):
    """(out, lse): p_j = exp(s_j - m) / (exp(sink - m) + sum exp(s_j - m)), s capped after the scale."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    sink = (torch.full((q.shape[1],), float("-inf"), dtype=torch.float64) if sinks is None else sinks.double())
    sink = sink.reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)
    m = torch.maximum(s.amax(-1, keepdim=True), sink)
    e, es = torch.exp(s - m), torch.exp(sink - m)
    den = e.sum(-1, keepdim=True) + es
    return (e / den) @ v, (m + den.log())[..., 0]


# ---------------------------------------------------------------------------------------------------------
# the reference


@pytest.mark.parametrize("Sq, Sk", [(17, 17), (113, 113), (1, 300), (17, 300)])
def test_window_full_or_unbounded_equals_causal(Sq, Sk):
    causal = kernel_hf.allowed(2, Sq, Sk, True, None, None)
    for window in [(Sk - 1, 0), (-1, -1), (-1, 0), (Sk + 50, 0), (None, None), (Sk - 1, 5)]:
        assert torch.equal(kernel_hf.allowed(2, Sq, Sk, True, window, None), causal), window
    assert not torch.equal(kernel_hf.allowed(2, Sq, Sk, True, (Sk - 2, 0), None), causal) or Sq == 1


@pytest.mark.parametrize("causal, window, Sq, Sk", [
    (True, (16, 0), 113, 113), (True, (0, 0), 40, 40), (True, (63, 0), 17, 300), (True, (63, 0), 1, 300),
    (False, (8, 8), 100, 100), (False, (20, 3), 17, 200), (False, (5, -1), 30, 30), (False, (-1, 4), 30, 30),
    (False, (0, 0), 9, 9), (True, (256, 0), 600, 600),
])  # fmt: skip
def test_window_mask_is_the_contracts(causal, window, Sq, Sk):
    mask = torch.ones(2, Sk, dtype=torch.long)
    mask[1, : Sk // 3] = 0
    assert torch.equal(kernel_hf.allowed(2, Sq, Sk, causal, window, mask), formula_keep(Sq, Sk, causal, window, mask,
                                                                                         2))  # fmt: skip


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_window_is_create_sliding_window_causal_mask(impl):
    """transformers' sliding_window=W on a causal layer is the window (W - 1, 0), as Mistral's layers build it."""
    B, S, W = 2, 40, 17
    cfg = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=W,
                        num_hidden_layers=1)  # fmt: skip
    cfg._attn_implementation = impl
    am = torch.ones(B, S, dtype=torch.long)
    am[1, :9] = 0
    m = create_sliding_window_causal_mask(config=cfg, inputs_embeds=torch.zeros(B, S, 64), attention_mask=am,
                                          past_key_values=None, position_ids=torch.arange(S)[None].expand(B, S),
                                          allow_is_causal_skip=False)  # fmt: skip
    hf = m if m.dtype == torch.bool else m == 0
    assert torch.equal(hf, kernel_hf.allowed(B, S, S, True, kernels.sliding(W), am))


@pytest.mark.parametrize("name", ["all_three", "all_three_chunk", "window_asym", "window_padding", "softcap_50_x625",
                                  "sinks_padding", "sinks_negative", "window_bidir"])  # fmt: skip
def test_float64_reference_is_the_contracts_math(name):
    s = kernels.BY_NAME[name]
    c = kernels.reference(s, {})
    keep = formula_keep(s.Sq, s.Sk, s.causal, s.window, c.mask, c.q.shape[0])
    out, lse = formula(c.q, c.k, c.v, keep, kernels.scale_of(s), s.softcap, c.sinks)
    rows = c.keep[:, None, :, None].expand_as(out)
    assert (c.ref64 - out).abs()[rows].max() < 1e-12
    assert (c.lse64 - lse).abs()[c.keep[:, None, :].expand_as(lse)].max() < 1e-10
    assert (c.ref.double() - out).abs()[rows].max() < (1e-5 if s.dtype == torch.float32 else 0.5)


def test_float64_gemma2_softmaxes_in_float64_and_is_restored():
    s = kernels.BY_NAME["softcap_50_x25"]
    q, k, v, _ = s.build()
    q, k, v = q.double(), k.double(), v.double()
    keep = formula_keep(s.Sq, s.Sk, True, None, None, 1)
    want, _ = formula(q, k, v, keep, kernels.scale_of(s), s.softcap, None)
    m = kernel_hf.module(s.H, s.Hkv, s.d)
    bias = kernel_hf.additive(keep, torch.float64)
    as_is = modeling_gemma2.eager_attention_forward(m, q, k, v, bias, scaling=kernels.scale_of(s), softcap=50.0)[0]
    assert (as_is.transpose(1, 2) - want).abs().max() > 1e-9  # its float32 softmax: what the patch is for
    got = kernel_hf.forward(q, k, v, keep, kernels.scale_of(s), 50.0, None, path="float64")
    assert (got - want).abs().max() < 1e-13
    assert modeling_gemma2.nn is torch.nn
    with pytest.raises(RuntimeError), kernel_hf.float64_softmax():
        raise RuntimeError
    assert modeling_gemma2.nn is torch.nn


@pytest.mark.parametrize("path", ["eager", "float64"])
def test_limits_huge_cap_is_no_cap_and_sinks_at_minus_inf_are_none(path):
    s = kernels.BY_NAME["window_chunk"]
    q, k, v, mask = s.build()
    if path == "float64":
        q, k, v = q.double(), k.double(), v.double()
    keep = kernels.allowed(s, mask)
    sc = kernels.scale_of(s)
    plain = kernel_hf.forward(q, k, v, keep, sc, path=path)
    tol = 1e-12 if path == "float64" else 1e-6
    assert (kernel_hf.forward(q, k, v, keep, sc, softcap=1e9, path=path) - plain).abs().max() < tol
    none = torch.full((s.H,), float("-inf"))
    assert (kernel_hf.forward(q, k, v, keep, sc, sinks=none, path=path) - plain).abs().max() < tol
    assert (kernel_hf.forward(q, k, v, keep, sc, softcap=1e9, sinks=none, path=path) - plain).abs().max() < tol
    assert torch.equal(kernel_hf.lse(q, k, keep, sc, sinks=none), kernel_hf.lse(q, k, keep, sc))


def test_sinks_gradient_reference_is_the_formula():
    """dsinks[h] = -sum over (b, i) of P_sink * D, D = rowsum(dO * O) (the spec's FlashAttention-2 form)."""
    s = kernels.BY_NAME["all_three"]
    c = kernels.reference(s, {})
    g = grads.seeded_g(c.ref.shape, c.keep[:, None, :], s.dtype)
    keep4 = kernels.allowed(s, c.mask)
    got = grads.hf_kernel_grads(c.q, c.k, c.v, keep4, g, kernels.scale_of(s), s.dtype, float64=True,
                                softcap=s.softcap, sinks=c.sinks)["sinks"]  # fmt: skip
    p_sink = torch.exp(c.sinks.double().reshape(1, -1, 1) - c.lse64)
    D = (g.double() * c.ref64).sum(-1)
    assert got.dtype == torch.float64 and (got - (-(p_sink * D).sum((0, 2)))).abs().max() < 1e-10
    eager = grads.hf_kernel_grads(c.q, c.k, c.v, keep4, g, kernels.scale_of(s), s.dtype, softcap=s.softcap,
                                  sinks=c.sinks)["sinks"]  # fmt: skip
    assert eager.dtype == torch.float32 and (eager.double() - got).abs().max() < 1e-4 * got.abs().max()


def binds(s) -> dict[str, float]:
    """Per keyword the scenario uses: the change in the float64 reference without it, over its tolerance."""
    c = kernels.reference(s, {})
    tol = compare(kernels.rows_of(c.ref), kernels.rows_of(c.ref), kernels.rows_of(c.ref64), c.keep, s.dtype).tolerance
    if s.dtype != torch.float32:
        tol = 2 * (c.ref.double() - c.ref64).abs().max().item()
    off = {"window": {"window": None}, "softcap": {"softcap": 0.0}, "sinks": {"sinks": None}}
    out = {}
    for kw in s.uses():
        alt = kernels.reference(dataclasses.replace(s, **off[kw]), {})
        keep = c.keep[:, None, :, None].expand_as(c.ref64)
        out[kw] = (alt.ref64 - c.ref64).abs()[keep].max().item() / tol
    return out


def check_binds(names):
    for n in names:
        ratios = binds(kernels.BY_NAME[n])
        if n in EQUALS_CAUSAL:
            assert ratios == {"window": 0.0}, (n, ratios)
        else:
            assert min(ratios.values()) > 5, (n, ratios)  # each keyword moves the output well past the tolerance


def test_quick_scenarios_bind():
    check_binds([s.name for s in kernels.SCENARIOS if s.uses() and s.quick])


@pytest.mark.slow
def test_every_scenario_binds():
    check_binds([s.name for s in kernels.SCENARIOS if s.uses()])


def test_matrix_covers_the_issue():
    names = {s.name for s in kernels.SCENARIOS}
    by = [s for s in kernels.SCENARIOS if s.uses()]
    assert {(s.window[0] + 1) for s in by if s.window and s.causal and s.window[0] >= 0} >= {1, 17, 64, 257, 300}
    assert {s.Sk for s in by if s.window == kernels.sliding(64) and s.Sq == s.Sk} >= {63, 64, 65, 131}
    assert {s.dtype for s in by} == set(DTYPES.values()) and {s.d for s in by} >= {64, 128, 256}
    assert {(s.softcap, round(s.mult**2)) for s in by if s.softcap and not s.sinks} >= {(50.0, 25), (30.0, 50)}
    assert {s.sinks for s in by} >= set(kernels.SINKS.values())
    assert {"window_decode", "window_chunk", "window_padding", "window_full_causal", "all_three"} <= names
    quick = [s for s in by if s.quick]
    assert {k for s in quick for k in s.uses()} == set(kernels.KEYWORDS) and len(quick) <= 6


# ---------------------------------------------------------------------------------------------------------
# the call and the signature


def test_the_call_passes_a_keyword_only_when_the_scenario_uses_it():
    seen = []

    def rec(q, k, v, *, causal=True, scale=None, attention_mask=None, **kw):
        seen.append(kw)
        return hf_kernels.hf_all(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, **kw)

    impl = builtin("rec", rec, "core")
    for name in ["prefill_17", "window_chunk", "softcap_30_x50", "sinks_large", "all_three"]:
        s = kernels.BY_NAME[name]
        c = kernels.reference(s, {})
        core.call(impl, core.KERNELS, s, c)
        kw = seen[-1]
        assert set(kw) == set(s.uses()), (name, kw)
        if "window" in kw:
            assert kw["window"] == s.window and isinstance(kw["window"], tuple)
        if "sinks" in kw:
            assert kw["sinks"].dtype == torch.float32 and torch.equal(kw["sinks"], c.sinks)


def test_signatures_decide_what_is_passed():
    def plain(q, k, v, *, causal=True, scale=None, attention_mask=None):
        pass

    def windowed(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None):
        pass

    def anything(q, k, v, **kw):
        pass

    assert not accepts(signature_of(plain), "window")
    assert accepts(signature_of(windowed), "window") and not accepts(signature_of(windowed), "sinks")
    assert accepts(signature_of(anything), "sinks")
    assert signature_of(torch._C._nn.gelu) == {"names": [], "any": False}  # unreadable: takes nothing optional
    assert builtin("w", windowed, "core").accepts("window") and not builtin("p", plain, "core").accepts("window")
    s = kernels.BY_NAME["all_three"]
    why = core.unsupported(None, s, builtin("w", windowed, "core"))
    assert why == "no `softcap`, `sinks` keywords in its signature"
    assert core.unsupported(None, s, builtin("a", anything, "core")) is None


@pytest.mark.parametrize("claim", [None, "window", {"names": "window", "any": False}, {"names": ["window"]},
                                   {"names": ["window"], "any": "yes"}, [1, 2]])  # fmt: skip
def test_a_workers_malformed_signature_claim_takes_nothing_optional(claim):
    assert not accepts(claimed_signature(claim), "window")


def test_a_workers_claim_is_kept_in_signature_of_form():
    got = claimed_signature({"names": ["window", 3, "x" * 500], "any": False, "extra": 1})
    assert got == {"names": ["window"], "any": False} and accepts(got, "window")


# ---------------------------------------------------------------------------------------------------------
# plug-ins: transformers' own functions pass; a kernel without the keywords skips


def ran_scenarios(doc, spec):
    return {r["scenario"] for r in doc["results"] if r["impl"] == spec and r["skipped"] is None}


def expected_skips(spec_fn, quick: bool, dtypes=None) -> dict[str, str]:
    fn = getattr(hf_kernels, spec_fn)
    impl = builtin(spec_fn, fn, "core")
    return {s.name: core.unsupported(None, s, impl) for s in kernels.select(dtypes or set(DTYPES.values()), quick)
            if core.unsupported(None, s, impl)}  # fmt: skip


def check_plugins(doc, quick: bool):
    verdicts = {v["impl"]: v for v in doc["verdicts"]}
    for fn in ("eager_window", "gemma2_softcap", "gpt_oss_sinks", "hf_all"):
        v = verdicts[f"{HF}:{fn}"]
        assert v["passed"], (fn, v["stage"], v["hint"])
        assert {x["scenario"]: x["why"] for x in v["skipped"]} == expected_skips(fn, quick), fn
        ran = ran_scenarios(doc, f"{HF}:{fn}")
        assert ran and all(r["passed"] for r in doc["results"] if r["impl"] == f"{HF}:{fn}" and r["scenario"] in ran)
    assert verdicts[f"{HF}:hf_all"]["skipped"] == []
    feature_runs = {r["scenario"] for r in doc["results"]
                    if r["skipped"] is None and kernels.BY_NAME[r["scenario"]].uses()}  # fmt: skip
    assert feature_runs == {s.name for s in kernels.select(set(DTYPES.values()), quick) if s.uses()}
    lse = {r["scenario"] for r in doc["results"] if r["impl"] == f"{HF}:gpt_oss_sinks" and r["check"] == "lse"}
    assert {s.name for s in kernels.select(set(DTYPES.values()), quick) if s.sinks and not s.softcap} <= lse


def plugin_run(tmp_path, *args):
    out = tmp_path / "v.json"
    fns = ("eager_window", "gemma2_softcap", "gpt_oss_sinks", "hf_all")
    specs = [a for fn in fns for a in ("--core", f"{HF}:{fn}")]
    p = run(["-m", "harness", "verify", *args, *specs, "--json", str(out)], timeout=1800)
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    return p, json.loads(out.read_text())


def test_transformers_functions_pass_the_quick_scenarios_in_process():
    """The same functions as built-ins (this process, no worker): the fast version of the two tests below."""
    fns = ("eager_window", "gemma2_softcap", "gpt_oss_sinks", "hf_all")
    impls = [builtin(f"{HF}:{fn}", getattr(hf_kernels, fn), "core") for fn in fns]
    rows, verdicts = verify([], impls, set(DTYPES.values()), quick=True, log=lambda *_: None)
    doc = report.document(rows, verdicts, 0.0)
    check_plugins(doc, quick=True)


@pytest.mark.gate  # the same in workers as the in-process test above: a CI gate, out of make test's budget
def test_transformers_functions_pass_the_quick_scenarios(tmp_path):
    p, doc = plugin_run(tmp_path, "--quick")
    assert p.returncode == 0, p.stdout[-3000:]
    check_plugins(doc, quick=True)
    strict, _ = plugin_run(tmp_path, "--quick", "--strict")
    assert strict.returncode == 1 and f"FAIL (--strict) kernels / {HF}:eager_window" in strict.stdout
    assert f"FAIL (--strict) kernels / {HF}:hf_all" not in strict.stdout  # it takes every keyword: nothing skipped


@pytest.mark.gate  # the whole kernel matrix through workers: a CI gate (the quick one stays in make test)
def test_transformers_functions_pass_the_whole_matrix(tmp_path):
    p, doc = plugin_run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:]
    check_plugins(doc, quick=False)


# ---------------------------------------------------------------------------------------------------------
# gradients: the sinks' too


def test_sink_gradients_are_checked():
    rows, (v,) = verify([], [builtin("hf_all", hf_kernels.hf_all, "core")], {torch.float32}, quick=True,
                        grad=True, log=lambda *_: None)  # fmt: skip
    assert v.passed and not v.skipped, (v.stage, v.hint)
    assert {r.scenario for r in rows if r.check == "grad_sinks"} == {"all_three"}

    def half_sink_grad(q, k, v, *, causal=True, scale=None, attention_mask=None, **kw):
        if "sinks" in kw:  # the same value, half its gradient: only grad_sinks can tell
            kw["sinks"] = kw["sinks"] * 0.5 + kw["sinks"].detach() * 0.5
        return hf_kernels.hf_all(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, **kw)

    rows, (v,) = verify([], [builtin("half", half_sink_grad, "core")], {torch.float32}, quick=True, grad=True,
                        log=lambda *_: None)  # fmt: skip
    assert not v.passed and v.failing == ["all_three:grad"]
    assert [r.check for r in rows if not r.passed] == ["grad_sinks"]


# ---------------------------------------------------------------------------------------------------------
# how a skip is reported


def skip_run():
    rows = [Row("kernels", "k", "prefill_17", "float32", 0.1, compare(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3),
                torch.zeros(1, 2, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool), torch.float32))]
    why = "no `window` keyword in its signature"
    rows.append(Row("kernels", "k", "window_17", "float32", 0.0, skipped(why), skipped=why))
    return rows, [Verdict("kernels", "k", "core", True, skipped=[{"scenario": "window_17", "why": why}])]


def test_skips_in_the_table_the_verdict_line_the_summary_and_the_json():
    rows, verdicts = skip_run()
    assert "SKIP (no `window` keyword in its signature)" in report.table(rows)
    assert report.counts(rows) == (1, 0, 0, 1)
    line = report.verdict_lines(verdicts)[0]
    assert line.startswith("PASS (with skips) kernels / k: 1 scenario skipped: no `window`") and "--strict" in line
    assert report.verdict_lines(verdicts, strict=True)[0].startswith("FAIL (--strict) kernels / k")
    assert "1 passed, 0 failed" in report.summary_line(rows, 1.0, 0, 1) and "1 skipped" in report.summary_line(
        rows, 1.0, 0, 1)  # fmt: skip
    doc = report.document(rows, verdicts, 1.0)
    assert doc["summary"]["skipped"] == 1 and doc["verdicts"][0]["skipped"][0]["scenario"] == "window_17"
    assert doc["results"][1]["skipped"] and doc["results"][1]["passed"] is False


@pytest.mark.parametrize("strict", [False, True])
def test_skips_in_junit_and_github(strict):
    import xmlschema  # a test dependency (the dev extra), as in test_ci_output.py

    rows, verdicts = skip_run()
    xml = ci_output.junit(rows, verdicts, strict=strict)
    xmlschema.XMLSchema(Path(__file__).with_name("junit.xsd")).validate(xml.decode())  # raises if refused
    root = ET.fromstring(xml)
    case = next(c for c in root.iter("testcase") if c.get("name") == "window_17:forward")
    if strict:
        assert case.find("failure") is not None and case.find("failure").get("type") == "skipped"
    else:
        assert case.find("skipped") is not None and "window" in case.find("skipped").get("message")
        assert case.find("failure") is None
    summary = ci_output.step_summary(rows, verdicts, 1.0, 0, 1, strict=strict)
    assert ("**FAIL**" if strict else "**PASS (skips)**") in summary
    (note,) = ci_output.annotations(rows, verdicts, strict=strict)
    assert note.startswith("::error" if strict else "::warning") and "window_17" in note


def test_plugins_signatures_are_what_they_say():
    assert "window" in inspect.signature(hf_kernels.claims_window).parameters
    with pytest.raises(TypeError):
        hf_kernels.claims_window(*[torch.zeros(1, 1, 1, 4)] * 3, window=(1, 0))
