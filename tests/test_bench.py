"""The benchmark's instruments, checked on cases whose answers are known, and its command line (fast tier).

Timings are never asserted (performance targets live in the benchmark's report, not in tests): these tests check
that the bench measures the right computation and counts bytes correctly. Traffic: a matmul reads both operands and
writes the product, views move nothing, in-place ops read and write, broadcasts read one copy. Tensor peak: the
most bytes alive at once. Meta-device prediction (used for what cannot run here) equals the real run's counts.
Peak RSS: a call that allocates 200 MB shows 200 MB. Every bench case computes the same attention as transformers.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import one_line_error, run

from harness.bench import cases, meter, plan, report
from harness.bench import run as bench_run

F = 4  # float32 bytes


def test_traffic_of_known_ops():
    a, b = torch.ones(64, 32), torch.ones(32, 16)
    m, _ = meter.meter_call(lambda: a @ b)
    assert (m.traffic, m.ops) == (F * (64 * 32 + 32 * 16 + 64 * 16), 1)
    m, _ = meter.meter_call(lambda: (a.t(), a[:, :8], a.view(32, 64), a.transpose(0, 1).unsqueeze(0)))
    assert (m.traffic, m.ops) == (0, 0)  # views move no data
    c = torch.ones(1000)
    m, _ = meter.meter_call(lambda: c.mul_(2))
    assert m.traffic == 2 * F * 1000  # in place: read and write
    dst, src = torch.empty(1000), torch.ones(1000)
    m, _ = meter.meter_call(lambda: dst.copy_(src))
    assert m.traffic == 2 * F * 1000  # read src, write dst (dst is not read)
    row = torch.ones(1, 16)
    m, _ = meter.meter_call(lambda: a[:, :16] + row.expand(64, 16))
    assert m.traffic == F * (64 * 16 + 16 + 64 * 16)  # the broadcast row is read once
    m, _ = meter.meter_call(lambda: torch.empty(1000))
    assert m.traffic == 0  # allocation writes nothing


def test_tensor_peak_counts_what_is_alive_at_once():
    def f(device):
        x = torch.ones(1000, device=device)  # 4000
        y = x * 2  # 8000 alive
        del y  # 4000
        z = x + 1  # 8000 again, never 12000
        return z

    for device in ("cpu", "meta"):
        m, _ = meter.meter_call(lambda device=device: f(device))
        assert m.tensor_peak == 2 * F * 1000, device
    x = torch.ones(1000)
    m, _ = meter.meter_call(lambda: x.mul_(3))
    assert m.tensor_peak == 0  # inputs and in-place results are not new memory


@pytest.mark.parametrize("name", ["naive", "loop", "tiled", "hf_eager"])
def test_meta_prediction_equals_the_real_run(name):
    """What the bench reports for configurations that cannot run is computed on the meta device: it must be
    what the real run counts."""
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    real, _ = meter.meter_call(cases.make_case(name, s, 300, cfg).fn)
    pred = plan.predict(name, s, 300, cfg)
    print(f"{name}: real traffic {real.traffic} peak {real.tensor_peak}; meta {pred.traffic} {pred.tensor_peak}")
    assert (pred.traffic, pred.tensor_peak, pred.ops) == (real.traffic, real.tensor_peak, real.ops)
    assert real.tensor_peak > F * s.H * 300 * s.d  # at least the output


def test_naive_traffic_is_quadratic_and_tiled_tiles_round_trip_but_sdpa_does_not():
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    t = {}
    for name in ("naive", "tiled", "sdpa"):
        for n in (512, 1024):
            t[name, n], _ = meter.meter_call(cases.make_case(name, s, n, cfg).fn)
    assert t["naive", 1024].traffic > 3.5 * t["naive", 512].traffic  # Theta(N^2)
    assert t["tiled", 1024].traffic > 3 * t["tiled", 512].traffic  # tiles written and read: still Theta(N^2)
    q_k_v_o = F * 1024 * s.d * (2 * s.H + 2 * s.Hkv)
    assert q_k_v_o <= t["sdpa", 1024].traffic <= 1.05 * q_k_v_o  # one fused op: inputs, output (+ lse)
    assert t["naive", 1024].tensor_peak >= F * s.H * 1024 * 1024  # an S x S score matrix per head
    assert t["tiled", 1024].tensor_peak < F * s.H * 1024 * 1024 / 4  # no S x S tensor: tiles and the output


def test_every_case_computes_transformers_attention():
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    n = 200
    want = cases.make_case("hf_eager", s, n, cfg, seed=3).fn()  # (B, S, H, d)
    for name in ("naive", "loop", "tiled", "sdpa"):
        got = cases.make_case(name, s, n, cfg, seed=3).fn().transpose(1, 2)  # (B, S, H, d)
        err = float((got - want).abs().max())
        print(f"{name} vs HF eager (bench inputs, seq {n}): max |diff| {err:.2e}")
        assert err < 1e-4, (name, err)
    got = cases.make_case("hf_sdpa", s, n, cfg, seed=3).fn()
    assert float((got - want).abs().max()) < 1e-4
    with torch.no_grad():
        a = cases.make_case("layer_tiled", s, n, cfg, seed=4).fn()
        b = cases.make_case("layer_hf", s, n, cfg, seed=4).fn()
    err = float((a - b).abs().max())
    print(f"layer_tiled vs LlamaAttention: max |diff| {err:.2e}")
    assert a.shape == (1, n, s.D) and err < 1e-4


@pytest.mark.skipif(not meter._can_reset_hwm(), reason="needs Linux /proc/self/clear_refs (VmHWM reset)")
def test_peak_rss_sees_an_allocation():
    big = cases.Case("big", lambda: torch.ones(50 * 2**20), 0.0)  # 200 MiB, written
    small = cases.Case("small", lambda: torch.ones(1000), 0.0)
    _, peak_big, m = bench_run.measure(big, 1, hwm=True)
    _, peak_small, _ = bench_run.measure(small, 1, hwm=True)
    print(f"peak RSS: 200 MiB call -> {peak_big / 2**20:.0f} MiB, 4 KB call -> {peak_small / 2**20:.1f} MiB")
    assert 0.95 * 200 * 2**20 <= peak_big <= 1.2 * 200 * 2**20
    assert m.tensor_peak == 200 * 2**20
    assert peak_small < 16 * 2**20


def test_io_model_and_flops():
    s = cases.Shape(H=32, Hkv=8, d=64, D=2048)
    naive, tiled = cases.io_model(s, 4096)
    assert naive == 4 * 32 * (4 * 4096 * 64 + 4 * 4096**2)
    n1, t1 = cases.io_model(s, 16384)
    n2, t2 = cases.io_model(s, 32768)
    assert 3.9 < n2 / n1 <= 4 and 3.8 < t2 / t1 < 4.2  # both Theta(N^2) at these N, ...
    assert naive / tiled > 3  # ... but the standard form moves several times more
    assert cases.io_model(s, 4096, sram=4 * 227 * 1024)[1] < tiled  # more on-chip memory, less traffic
    from torch.utils.flop_counter import FlopCounterMode

    cfg = cases.llama_config()
    with FlopCounterMode(display=False) as fc:
        cases.make_case("naive", s, 128, cfg).fn()  # computes every (query, key) pair, masked or not
    assert fc.get_total_flops() == 4 * 32 * 64 * 128 * 128
    assert cases.core_flops(s, 128) == 4 * 32 * 64 * 128 * 129 / 2


@pytest.mark.slow  # 10 s: roofline, runs, matplotlib (keeps make test-fast under 2 min)
def test_cli_rows_json_and_plot(tmp_path, monkeypatch):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = report.main(["--seq", "128,256", "--impl", "tiled,sdpa,naive", "--runs", "2", "--json", str(out),
                     "--plot", str(png)])  # (--runs below 5 only to keep the test short)
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["seq"]) for r in rows] == [
        (i, n) for n in (128, 256) for i in ("tiled", "sdpa", "naive")
    ]
    for r in rows:
        assert {"impl", "seq", "median_s", "peak_bytes", "traffic_bytes", "ran"} <= set(r)
        assert r["ran"] is True and r["median_s"] > 0 and r["peak_bytes"] > 0 and r["traffic_bytes"] > 0
        assert r["runs"] >= 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # 3 s each (keeps make test-fast under 2 min)
def test_what_cannot_run_is_computed_and_labelled(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "_meminfo", lambda key: 3 * 10**6)  # "3 MB free": naive's scores do not fit
    out = tmp_path / "b.json"
    assert report.main(["--seq", "256", "--impl", "naive,sdpa", "--runs", "1", "--json", str(out)]) == 0
    naive, sdpa = json.loads(out.read_text())
    assert naive["ran"] is False and naive["median_s"] is None
    assert naive["peak_bytes"] >= F * 32 * 256 * 256 and naive["peak_method"].startswith("computed")
    assert naive["traffic_bytes"] > 0 and "cannot run" in naive["reason"]
    assert sdpa["ran"] is True  # fused: O(S d), never planned out


@pytest.mark.slow  # 10 s: roofline, runs, matplotlib (keeps make test-fast under 2 min)
def test_time_budget_skips_and_says_so(tmp_path):
    out = tmp_path / "b.json"
    assert report.main(["--seq", "128,1024", "--impl", "naive", "--runs", "1", "--max-config-s", "0.001",
                       "--json", str(out)]) == 0
    small, big = json.loads(out.read_text())
    assert small["ran"] and not big["ran"] and "--max-config-s" in big["reason"]
    assert big["peak_bytes"] >= F * 32 * 1024 * 1024  # still computed


@pytest.mark.parametrize(
    "args, says",
    [(["--seq", "1024,x"], "--seq"), (["--seq", "0"], "--seq"), (["--impl", "flash9"], "--impl flash9"),
     (["--runs", "0"], "--runs"), (["--bogus"], "unrecognized")],
)
def test_bad_arguments_one_line_exit_2(args, says, capsys):
    with pytest.raises(SystemExit) if args == ["--bogus"] else contextlib.nullcontext():
        assert report.cli(args) == 2
    assert says in one_line_error(capsys.readouterr().err)


@pytest.mark.slow  # 3 s each (keeps make test-fast under 2 min)
def test_bad_argument_from_the_command_line():
    p = run(["scripts/bench.py", "--impl", "tiled,flash9"], timeout=120)
    assert p.returncode == 2
    assert "--impl flash9: unknown" in one_line_error(p)


def test_replot_redraws_from_json_and_rejects_other_files(tmp_path, capsys):
    rows = [{"impl": "tiled", "seq": 1024, "ran": True, "median_s": 0.1, "peak_bytes": 3e7, "traffic_bytes": 9e8,
             "cpu": "x", "threads": 2, "torch": "2", "matmul_gflops": 100.0},
            {"impl": "naive", "seq": 1024, "ran": False, "median_s": None, "peak_bytes": 5e8, "traffic_bytes": 2e9,
             "cpu": "x", "threads": 2, "torch": "2", "matmul_gflops": 100.0}]
    src, png = tmp_path / "rows.json", tmp_path / "p.png"
    src.write_text(json.dumps(rows))
    assert report.main(["--replot", str(src), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"not": "rows"}')
    assert report.cli(["--replot", str(tmp_path / "bad.json"), "--plot", str(png)]) == 2
    assert "--replot" in one_line_error(capsys.readouterr().err)
