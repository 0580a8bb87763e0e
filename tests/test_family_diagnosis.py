"""The diagnosis of the families' fields (issue 26): the catalog's family bugs fail with their stage (qk_norm,
qkv_bias, partial_rotary, scale, softcap, sliding_window, sinks, rope_frequencies, output_projection), held out or
not; bugs written here, in no catalog, are named right too (the suspects come from the fixture's fields, not from the
catalog); the family scenarios run where the field is, and only there."""

from __future__ import annotations

import pytest
import torch

from harness.bugs import family_mistakes as fm
from harness.bugs import pipeline
from harness.bugs.catalog import CATALOG, pick
from harness.checkpoints.format import load_fixture
from harness.mutants import DEFAULT_FIXTURES
from harness.verify import scenarios
from harness.verify.run import verify

FAMILY_STAGES = {"qk_norm", "qkv_bias", "partial_rotary"}
FAMILY_FIXTURES = ["qwen3-synthetic", "qwen2-synthetic", "gemma2-synthetic", "gpt-oss-synthetic", "phi3-synthetic",
                   "mistral-synthetic", "gemma3-270m", "gemma3-270m-global"]  # fmt: skip
# the family bugs: every layer bug that shows on no Llama fixture
LLAMA = [f for f in DEFAULT_FIXTURES if f not in FAMILY_FIXTURES]
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def fixtures():
    return {n: load_fixture(n) for n in FAMILY_FIXTURES + LLAMA}


@pytest.fixture(scope="module")
def refs():
    return {}


def family_bugs(fixtures) -> list:
    return [b for b in CATALOG if b.contract == "layer" and b.kind == "forward"
            and not any(b.shows(fixtures[n].layer_config) for n in LLAMA)]  # fmt: skip


def run(fixture, name: str, fn, refs):
    rows, (v,) = verify([fixture], [(name, fn)], {torch.float32}, quick=True, cache=refs, **QUIET)
    return rows, v


def test_the_catalog_has_twelve_family_bugs_a_third_held_out(fixtures):
    bugs = family_bugs(fixtures)
    assert len(bugs) >= 12, [b.name for b in bugs]
    held = [b for b in bugs if b.held_out]
    assert 3 * len(held) >= len(bugs) - 2, [b.name for b in held]  # a third, rounded
    assert FAMILY_STAGES <= {b.stage for b in bugs}
    assert {b.stage for b in held} >= {"qk_norm", "qkv_bias", "partial_rotary", "sliding_window"}


NAMES = ["qk_norm_all_heads", "qk_norm_after_rope", "qk_norm_gain_w", "k_norm_missing", "k_bias_missing",
         "v_bias_missing", "o_bias_missing", "query_pre_attn_scalar_ignored", "local_layer_global_rope",
         "partial_rotary_all_dims", "partial_rotary_last_dims", "window_missing_on_sliding", "window_on_full_layers",
         "gemma2_softcap_missing", "sinks_dropped"]  # fmt: skip


def test_the_names_are_the_family_bugs(fixtures):
    assert {b.name for b in family_bugs(fixtures)} == set(NAMES)


@pytest.mark.gate  # make mutants runs them all too (every scenario and dtype); here float32, quick
@pytest.mark.parametrize("name", NAMES)
def test_family_bugs_fail_with_their_stage(name, fixtures, refs):
    bug = pick(name)
    fx = next(fixtures[n] for n in FAMILY_FIXTURES if bug.shows(fixtures[n].layer_config))
    rows, v = run(fx, name, bug.layer(), refs)
    assert not v.passed and v.stage == bug.stage, (fx.name, v.stage, v.hint)


# bugs in no catalog, each explained by a field of the fixture


def _q_norm_as_one_plus_w(q, k, w, config):  # Qwen3 read as Gemma: (1 + w) gains
    return pipeline.norm(q, k, w, {**config, "model_type": "gemma3"})


UNSEEN = [
    ("qwen2-synthetic", "q_bias_missing", fm.without("q_proj.bias"), "qkv_bias", "q_proj.bias"),
    ("gpt-oss-synthetic", "qkv_biases_missing", fm.without("q_proj.bias", "k_proj.bias", "v_proj.bias"), "qkv_bias",
     "biases"),
    ("qwen3-synthetic", "q_norm_missing", fm.without("q_norm"), "qk_norm", "q_norm"),
    ("qwen3-synthetic", "qwen3_gain_one_plus_w", pipeline.layer(norm=_q_norm_as_one_plus_w), "qk_norm", "(1 + w)"),
    ("gemma2-synthetic", "gemma2_cap_before_scale", pipeline.layer(keywords=fm.with_keywords(
        lambda k, c: {**k, "softcap": k["softcap"] * k["scale"]})), "softcap", "before the scale"),
    ("gpt-oss-synthetic", "window_one_key_wider", pipeline.layer(keywords=fm.with_keywords(
        lambda k, c: {**k, "window": (k["window"][0] + 1, 0)})), "sliding_window", "too wide"),
    ("gemma3-270m-global", "global_layer_local_rope", pipeline.layer(tables=fm.rope_of("sliding_attention")),
     "rope_frequencies", "sliding_attention layers"),
]  # fmt: skip


@pytest.mark.parametrize(("fixture", "name", "fn", "stage", "said"), UNSEEN, ids=[u[1] for u in UNSEEN])
def test_bugs_in_no_catalog_are_named_from_the_fields(fixture, name, fn, stage, said, fixtures, refs):
    assert name not in {b.name for b in CATALOG}
    rows, v = run(fixtures[fixture], name, fn, refs)
    assert not v.passed and v.stage == stage and said in v.hint, (v.stage, v.hint)


def test_family_scenarios_run_where_the_field_is(fixtures):
    for name, f in fixtures.items():
        chosen = {s.name for s in scenarios.select(f, {torch.float32}, quick=True)}
        c = f.layer_config
        assert ("window_edge" in chosen) == bool(c.get("sliding_window")), name
        assert ("softcap_bend" in chosen) == bool(c.get("attn_logit_softcapping")), name
        if "window_edge" in chosen:  # the window binds: some query has keys outside it
            x, pos, _ = scenarios.BY_NAME["window_edge"].build(f, torch.float32)
            assert x.shape[1] > c["sliding_window"]


def test_right_layers_pass_the_family_scenarios(fixtures, refs):
    for name in ("gemma2-synthetic", "gpt-oss-synthetic", "gemma3-270m-global"):
        rows, v = run(fixtures[name], "textbook", pipeline.layer(), refs)
        ran = {r.scenario for r in rows}
        assert v.passed and ran & {"window_edge", "softcap_bend"}, (name, v.stage, v.hint, ran)
