"""The module contract tells build() the sizes of the run (issue 24): config carries max_batch_size, max_seq_len and
max_position (names exact), the largest batch, length and position id of the scenarios that will run for that
implementation on that fixture, and no call (a scenario, a gradient, a diagnosis probe) goes beyond what its build
was told. The layer contract's config carries the same keys."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run
from plugins import sized

from harness.verify.contracts import layer
from harness.verify.loop import Context
from harness.verify.plugins import Builtin
from harness.verify.run import DTYPES, resolve_fixtures
from harness.verify.scenarios import select

KEYS = ("max_batch_size", "max_seq_len", "max_position")  # the names, exact
SIZED = "tests/plugins/sized.py"
ALL_DTYPES = set(DTYPES.values())


def expected(name: str, quick: bool) -> dict:
    """The largest batch, length and position id of the scenarios themselves, worked out here."""
    f = resolve_fixtures([name])[0]
    b = s = p = 0
    for sc in select(f, ALL_DTYPES, quick):
        x, pos, _ = sc.build(f, torch.float32)
        b, s, p = max(b, x.shape[0]), max(s, x.shape[1]), max(p, int(pos.max()))
    top = f.config["max_position_embeddings"]
    assert top < p < 2 * top  # beyond_context reaches past the trained context, up to twice it
    return {"max_batch_size": b, "max_seq_len": s, "max_position": p}


def verify_logged(tmp_path, monkeypatch, *args) -> tuple:
    log, out = tmp_path / "sizes.jsonl", tmp_path / "v.json"
    monkeypatch.setenv("SIZED_LOG", str(log))  # the workers inherit it
    p = run(["-m", "harness", "verify", *args, "--json", str(out)])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return p, {v["impl"]: v for v in json.loads(out.read_text())["verdicts"]}, calls


def held(calls: list[dict]) -> None:
    assert calls
    for c in calls:
        assert tuple(c["told"]) == KEYS
        assert all(c["got"][k] <= c["told"][k] for k in KEYS), c


@pytest.mark.slow
def test_quick_set_calls_stay_within_the_announced_sizes(tmp_path, monkeypatch):
    """A module that raises on any call beyond its build's sizes passes --quick; an imprecise one is diagnosed (not a
    crash); a layer sees the same keys. What build is told is exactly the quick set's largest sizes."""
    impls = ["--module", f"{SIZED}:build", f"{SIZED}:build_pv_fp16", "--impl", f"{SIZED}:attention"]
    p, v, calls = verify_logged(tmp_path, monkeypatch, "--fixture", "smollm2-135m", "--quick", *impls)
    assert v[f"{SIZED}:build"]["passed"] and v[f"{SIZED}:attention"]["passed"], p.stdout[-3000:]
    assert v[f"{SIZED}:build_pv_fp16"]["stage"] not in ("crash", "contract"), v[f"{SIZED}:build_pv_fp16"]
    held(calls)
    want = expected("smollm2-135m", quick=True)
    assert {c["who"]: c["told"] for c in calls if c["who"] != "build_pv_fp16"} == {"build": want, "attention": want}


@pytest.mark.slow
def test_full_set_and_gradients_stay_within_the_announced_sizes(tmp_path, monkeypatch):
    """The full scenario set with --grad, on two fixtures: every forward and gradient call within its build's sizes,
    the sizes each fixture's own."""
    fixtures = ["smollm2-135m", "rope-yarn-synthetic"]
    p, v, calls = verify_logged(tmp_path, monkeypatch, "--fixture", *fixtures, "--grad", "--module",
                                f"{SIZED}:build")  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert v[f"{SIZED}:build"]["passed"]
    held(calls)
    told = {json.dumps(c["told"], sort_keys=True) for c in calls}
    assert told == {json.dumps(expected(f, quick=False), sort_keys=True) for f in fixtures}
    assert max(c["got"]["max_seq_len"] for c in calls) == 1000  # len_1000 ran (long_2048 is for Llama shapes)


def test_a_probe_longer_than_the_run_is_announced_too(tmp_path, monkeypatch):
    """The diagnosis's probes may be longer than any --quick scenario (the precision probes' 512 tokens): each probe
    call is built anew and told the larger of the run's sizes and its own input's."""
    monkeypatch.setenv("SIZED_LOG", str(tmp_path / "sizes.jsonl"))
    f = resolve_fixtures(["smollm2-135m"])[0]
    ctx = Context(ALL_DTYPES, quick=True)
    impl = Builtin("sized", "module", sized.build)
    probe = layer.prober(impl, f, ctx)
    x = torch.randn(1, 512, f.config["hidden_size"])
    out = probe(x, layer.weights_in(f, torch.float32), torch.zeros(1, 512, dtype=torch.long), None)  # raises if beyond
    assert out.shape == x.shape
    ((call,),) = [[json.loads(line) for line in (tmp_path / "sizes.jsonl").read_text().splitlines()]]
    assert call["told"] == dict(expected("smollm2-135m", quick=True), max_seq_len=512)


def test_the_weights_key_names_the_sizes():
    """A worker keeps what build() made per weights key: a run with larger sizes (the full set after --quick, in one
    process) must not reuse a module built for smaller ones."""
    f = resolve_fixtures(["smollm2-135m"])[0]
    quick, full = (layer.cases(f, Context({torch.float32}, q), None) for q in (True, False))
    (k1, c1), (k2, c2) = layer.announced(f, quick[0]), layer.announced(f, full[0])
    assert k1 != k2 and c1["max_seq_len"] < c2["max_seq_len"]
    assert c1.items() >= f.config.items() and set(c1) - set(f.config) == set(KEYS) | {"layer_idx", "layer_type"}
