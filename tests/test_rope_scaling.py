"""RoPE scaling at the layer level: the fixtures rope-linear-synthetic, rope-dynamic-synthetic and rope-yarn-synthetic
(small Llama-shaped configs, generated on demand like the Llama one), every built-in passing them (positions past
the trained context included, where dynamic scaling recomputes its frequencies), and every scaling bug of the catalog
named `rope_frequencies` (never `tiling`), with a hint that says which part."""

from __future__ import annotations

import re

import pytest
import torch

from harness.bugs.catalog import CATALOG, pick
from harness.verify.plugins import resolve
from harness.verify.run import DTYPES, resolve_fixtures, verify

ROPE_FIXTURES = ["rope-linear-synthetic", "rope-dynamic-synthetic", "rope-yarn-synthetic"]
SCALING = [b.name for b in CATALOG if b.stage == "rope_frequencies" and b.kind == "forward"
           and b.name != "local_layer_global_rope"]  # a family's field: tests/test_family_diagnosis.py
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def refs():
    return {}


def test_the_fixtures_are_what_they_say():
    kinds = {f.name: f.config["rope_parameters"]["rope_type"] for f in resolve_fixtures(ROPE_FIXTURES)}
    assert kinds == {"rope-linear-synthetic": "linear", "rope-dynamic-synthetic": "dynamic",
                     "rope-yarn-synthetic": "yarn"}  # fmt: skip
    assert all(f.synthetic for f in resolve_fixtures(ROPE_FIXTURES))


@pytest.mark.parametrize("name", ["naive", "tiled", "sdpa"])
def test_builtins_pass_every_rope_type(name, refs):
    rows, verdicts = verify(resolve_fixtures(ROPE_FIXTURES), [resolve(name)], {torch.float32}, quick=True,
                            cache=refs, **QUIET)  # fmt: skip
    assert all(v.passed and not v.imprecise for v in verdicts), verdicts
    assert {r.scenario for r in rows} >= {"beyond_context", "sparse_positions"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["naive", "loop", "tiled", "sdpa"])  # triton, interpreted: `make verify` (CI)
def test_builtins_pass_every_rope_type_everywhere(name, refs):
    _, verdicts = verify(resolve_fixtures(ROPE_FIXTURES), [resolve(name)], set(DTYPES.values()), quick=False,
                         cache=refs, **QUIET)  # fmt: skip
    assert all(v.passed and not v.imprecise for v in verdicts), verdicts


def _small(bug: str) -> bool:
    """Shows on one of the small rope fixtures (fast); the llama3 ones need the Llama-sized fixture (slow tier)."""
    return any(pick(bug).shows({"rope_parameters": {"rope_type": t, "rope_theta": 1.0, "factor": 2.0}})
               for t in ("linear", "dynamic", "yarn"))  # fmt: skip


@pytest.mark.parametrize("bug", [b if _small(b) else pytest.param(b, marks=pytest.mark.slow) for b in SCALING])
def test_scaling_bugs_are_rope_frequencies(bug, refs):
    b = pick(bug)
    fixtures = [f for f in resolve_fixtures(ROPE_FIXTURES + ["llama-3.2-1b-synthetic", "smollm2-135m"])
                if b.shows(f.config)][:1]  # fmt: skip
    assert fixtures, f"no fixture on which {bug} can show"
    _, (v,) = verify(fixtures, [(bug, b.layer())], {torch.float32}, quick=True, cache=refs, **QUIET)
    assert not v.passed and v.stage == "rope_frequencies", (v.stage, v.hint)
    config = fixtures[0].config
    if not b.held_out:  # its own suspect matched: its hint, naming the fixture's rope type
        assert (v.matched, v.hint) == (bug, b.hint_for(config)), (v.matched, v.hint)
        assert config["rope_parameters"]["rope_type"] in v.hint, v.hint
    elif v.matched == "rope_fit":  # found by fitting the rotary base on each failing length: the bases named
        assert "rotary" in v.hint and f"{config['rope_parameters']['rope_theta']:g}" in v.hint, v.hint
    else:  # found by recomputing the frequencies with one of the fixture's own rope parameters changed: named
        assert v.matched.startswith("rope:"), (v.matched, v.hint)
        changed = re.split(r"[=<]", v.matched.removeprefix("rope:"))[0].removesuffix("_missing")
        assert changed in v.hint and "rope_parameters" in v.hint, (v.matched, v.hint)


def test_every_rope_type_has_a_scaling_bug_and_two_are_held_out():
    kinds = {"linear", "dynamic", "yarn", "llama3"}
    covered = {k for k in kinds for b in CATALOG if b.stage == "rope_frequencies"
               and b.shows({"rope_parameters": {"rope_type": k, "rope_theta": 1.0}})  # fmt: skip
               and not b.shows({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}})}
    assert covered == kinds
    held = [b for b in CATALOG if b.held_out and b.stage == "rope_frequencies"]
    assert len(held) >= 2
