"""The diagnosis of the kernel contract's window, softcap and sinks (issue 25): the catalog's keyword bugs fail with
their stage (sliding_window, softcap, sinks), held out or not; bugs written here, in no catalog, are named right too
(the probes measure, they do not recognise); the probes find nothing wrong in a right kernel, transformers' own
functions included; the hints say what was measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from harness.bugs import pipeline
from harness.bugs.catalog import CATALOG, pick
from harness.verify import kernels
from harness.verify.contracts import core
from harness.verify.diagnosis import feature_probes
from harness.verify.run import DTYPES, builtin, verify

KEYWORD_STAGES = {"sliding_window", "softcap", "sinks"}
FEATURE_BUGS = [b.name for b in CATALOG if b.contract == "core" and b.kind == "forward" and b.stage in KEYWORD_STAGES]
# a plain scenario that passes (the keyword diagnosis needs one), and every keyword's float32 cases the bugs fail
SUBSET = {"prefill_17", "padding", "window_17", "window_chunk", "window_bidir", "softcap_30_x50", "sinks_large",
          "all_three"}  # fmt: skip
QUIET = {"log": lambda *_: None}

_spec = importlib.util.spec_from_file_location("hf_kernels_diag", Path(__file__).parent / "plugins" / "hf_kernels.py")
hf_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_kernels)


@pytest.fixture(scope="module")
def refs():
    return {}


@pytest.fixture
def subset(monkeypatch):
    monkeypatch.setattr(kernels, "SCENARIOS", [s for s in kernels.SCENARIOS if s.name in SUBSET])


def run(name: str, fn, refs):
    rows, (v,) = verify([], [builtin(name, fn, "core")], set(DTYPES.values()), quick=False, cache=refs, **QUIET)
    return rows, v


def test_the_catalog_has_the_keyword_bugs_a_third_held_out():
    assert len(FEATURE_BUGS) >= 10
    held = [n for n in FEATURE_BUGS if pick(n).held_out]
    assert len(held) * 3 >= len(FEATURE_BUGS) - 1, held  # a third, rounded down
    assert {pick(n).stage for n in held} == KEYWORD_STAGES  # every keyword has an unseen bug


@pytest.mark.parametrize("name", FEATURE_BUGS)
def test_keyword_bugs_fail_with_their_stage(name, refs, subset):
    bug = pick(name)
    rows, v = run(name, bug.kernel(), refs)
    assert not v.passed and v.stage == bug.stage, (v.stage, v.hint)
    failed = {r.scenario for r in rows if not r.passed}
    assert failed and all(kernels.BY_NAME[n].uses() for n in failed), failed  # plain scenarios pass


# bugs in no catalog: the probes must name them from what they measure


def _window_plus_2(Sq, Sk, window):
    left = window[0] + 2 if window[0] is not None and window[0] >= 0 else window[0]
    return pipeline.window_keep(Sq, Sk, (left, window[1]))


def _cap_without_division(s, softcap, scale):
    return softcap * torch.tanh(s)


def _head_0_sink(sinks, H, Hkv):
    return sinks[:1].expand(H)


def _sink_outside_denominator(s, allowed, sinks):
    col = sinks.to(s.dtype).reshape(1, -1, 1, 1)
    s = s.masked_fill(~allowed, float("-inf"))
    e = torch.exp(s - torch.maximum(s.amax(-1, keepdim=True), col))  # the sink joins the max, not the sum
    return e / e.sum(-1, keepdim=True).clamp(min=1e-30)


UNSEEN = {
    "window_plus_2": ({"window": _window_plus_2}, "sliding_window", "query p sees back to p - 9, not p - 7"),
    "cap_no_division": ({"cap": _cap_without_division}, "softcap", "the scores 10, 20, 30 come out as 10, 10, 10"),
    "sink_of_head_0": ({"sink_of": _head_0_sink}, "sinks", "0->0, 1->0, 2->0, 3->0"),
    "sink_not_summed": ({"sink_softmax": _sink_outside_denominator}, "sinks", "the sink takes no share"),
}


@pytest.mark.parametrize("name", list(UNSEEN))
def test_bugs_in_no_catalog_are_named_from_what_the_probes_measure(name, refs, subset):
    steps, stage, seen = UNSEEN[name]
    rows, v = run(name, pipeline.core(**steps), refs)
    assert not v.passed and v.stage == stage and seen in v.hint, (v.stage, v.hint)


def test_hints_say_what_was_measured(refs, subset):
    """The issue's example: a window one key too wide says so, with the windows measured and expected."""
    _, v = run("wide", pick("window_one_too_many").kernel(), refs)
    assert "sees one key too many at the window's left edge" in v.hint and "(8, 0)" in v.hint, v.hint
    assert "sliding_window W is (W - 1, 0)" in v.hint
    _, v = run("before", pick("softcap_before_scale").kernel(), refs)
    assert "saturate at +-1.25" in v.hint and "before the scale" in v.hint, v.hint


# ---------------------------------------------------------------------------------------------------------
# the probes on right kernels: nothing to report


def call_of(fn):
    impl = builtin("probe", fn, "core")
    return lambda *a, **kw: core.run_kernel(impl, *a, **kw)


@pytest.mark.parametrize("fn", [pipeline.core(), hf_kernels.hf_all, hf_kernels.gpt_oss_sinks],
                         ids=["pipeline", "hf_all", "gpt_oss_sinks"])  # fmt: skip
def test_probes_find_nothing_in_a_right_kernel(fn):
    call = call_of(fn)
    assert feature_probes.window(call) is None
    assert feature_probes.softcap(call) is None  # (gpt_oss_sinks takes no softcap: a probe it cannot answer)
    assert feature_probes.sinks(call) is None
    assert feature_probes.sinks(call, lse_only=True) is None


def test_the_probes_read_the_window_edges_off_one_call():
    """v one-hot per key, q = k = 0: out[i, j] > 0 exactly where query i sees key j."""
    call = call_of(pipeline.core())
    seen = feature_probes.weights(call, 48, 48, True, (7, 0)) > feature_probes.SEEN
    assert torch.equal(seen, feature_probes.expected(48, 48, True, (7, 0)))
    assert feature_probes.edges(seen, 48, 48) == (7, 0, True)
    seen = feature_probes.weights(call, 48, 48, False, (5, 3)) > feature_probes.SEEN
    assert feature_probes.edges(seen, 48, 48) == (5, 3, True)
