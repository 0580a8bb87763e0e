"""The benchmark's instruments, checked on cases whose answers are known, and its command line (fast tier).

Timings are never asserted (performance targets live in the benchmark's report, not in tests): these tests check
that the bench measures the right computation and counts bytes correctly. Traffic: a matmul reads both operands and
writes the product, views move nothing, in-place ops read and write, broadcasts read one copy. Tensor peak: the
most bytes alive at once. Meta-device prediction (used for what cannot run here) equals the real run's counts,
backward cases' forward state included. Peak RSS: a call that allocates 200 MB shows 200 MB. Every bench case
computes the same attention as transformers; every backward case returns transformers' gradients. The Triton
kernel's counted traffic equals its closed form where the bench counts it (128 here, 384 in test_triton.py; the
full run counts 1024 and records the comparison in its row), and beyond the interpreter's budget the bench plans no
interpreted call. Rows say their direction and device; --device cuda without CUDA is one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import one_line_error, run

from harness.bench import cases, meter, plan, report
from harness.bench import run as bench_run
from harness.common import UserError, update_generated

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


@pytest.mark.parametrize("name, direction, window", [
    ("naive", "forward", None), ("loop", "forward", None), ("tiled", "forward", None), ("hf_eager", "forward", None),
    ("naive", "backward", None), ("tiled", "backward", None), ("hf_eager", "backward", None),
    ("tiled", "forward", 64), ("tiled", "backward", 64), ("hf_eager", "forward", 64)])  # fmt: skip
def test_meta_prediction_equals_the_real_run(name, direction, window):
    """What the bench reports for configurations that cannot run is computed on the meta device: it must be
    what the real run counts (for a backward case: its call, and the forward state it needs alive)."""
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    case = cases.make_case(name, s, 300, cfg, direction=direction, window=window)
    real, _ = meter.meter_call(case.fn)
    pred = plan.predict(name, s, 300, cfg, direction, window)
    print(f"{name} {direction}: real traffic {real.traffic} peak {real.tensor_peak} held {case.held}; "
          f"meta {pred.traffic} {pred.tensor_peak} {pred.held}")  # fmt: skip
    assert (pred.traffic, pred.tensor_peak, pred.ops) == (real.traffic, real.tensor_peak, real.ops)
    assert pred.held == case.held
    assert real.tensor_peak > F * s.H * 300 * s.d  # at least the output (backward: dq)
    if direction == "backward":
        assert case.held >= F * s.H * 300 * s.d  # at least the forward's output


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
    want = cases.make_case("hf_eager", s, n, cfg, seed=3).fn()  # (B, H, S, d): transformers' output, transposed
    assert want.shape == (1, s.H, n, s.d)
    for name in ("naive", "loop", "tiled", "sdpa"):
        got = cases.make_case(name, s, n, cfg, seed=3).fn()  # (B, H, S, d)
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


def test_backward_cases_compute_transformers_gradients():
    """Each backward case's call is the gradient of its forward: dq, dk, dv equal autograd through transformers'
    eager_attention_forward on the case's own q, k, v and output gradient (whole tensors), and a second call (the
    timed ones) gives them again."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    n = 200
    for name in cases.BACKWARD:
        case = cases.make_case(name, s, n, cfg, seed=3, direction="backward")
        q, k, v, dout = (t.detach().clone().requires_grad_() for t in case.inputs)
        bias = torch.full((n, n), torch.finfo(torch.float32).min).triu_(1)[None, None]  # as transformers builds it
        out = eager_attention_forward(cases._module(s), q, k, v, bias, scaling=s.d**-0.5)[0]  # (B, S, H, d)
        want = torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))
        first, again = case.fn(), case.fn()
        for grad, w, g2, what in zip(first, want, again, ("dq", "dk", "dv"), strict=True):
            err = float((grad - w).abs().max())
            print(f"{name} backward {what} vs autograd through HF eager (seq {n}): max |diff| {err:.2e}")
            assert grad.shape == w.shape and err < 1e-4, (name, what, err)
            assert torch.equal(grad, g2), (name, what)
        assert case.flops == 2 * cases.core_flops(s, n) and case.held > 0


def test_backward_plan_counts_the_forward_state(monkeypatch):
    """A backward call needs its forward's saved tensors alive too: the planner adds them to the call's peak."""
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    pred = plan.predict("naive", s, 256, cfg, "backward")
    assert pred.held >= 2 * F * s.H * 256 * 256  # naive keeps S x S tensors (scores, probabilities) for its backward
    free = pred.tensor_peak + pred.held // 2  # the call alone would fit, with its forward state it does not
    monkeypatch.setattr(plan, "meminfo", lambda key: free)
    why, _ = plan.plan("naive", s, 256, cfg, None, calls=1, max_s=1e9, mem_fraction=1.0, direction="backward")
    assert "cannot run" in why and "forward state" in why
    monkeypatch.setattr(plan, "meminfo", lambda key: pred.tensor_peak + pred.held)
    assert plan.plan("naive", s, 256, cfg, None, calls=1, max_s=1e9, mem_fraction=1.0, direction="backward")[0] == ""


@pytest.mark.slow
@pytest.mark.skipif(not meter.can_reset_hwm(), reason="needs Linux /proc/self/clear_refs (VmHWM reset)")
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


@pytest.mark.slow  # roofline, runs, matplotlib: too slow for make test-fast
def test_cli_rows_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "MIN_TIMED_S", 0.0)  # the runs asked for, not 2 s of them (the roofline is real)
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


@pytest.mark.slow  # a bench run: too slow for make test-fast
def test_what_cannot_run_is_computed_and_labelled(tmp_path, monkeypatch, no_roofline):
    monkeypatch.setattr(plan, "meminfo", lambda key: 3 * 10**6)  # "3 MB free": naive's scores do not fit
    out = tmp_path / "b.json"
    assert report.main(["--seq", "256", "--impl", "naive,sdpa", "--runs", "1", "--json", str(out)]) == 0
    naive, sdpa = json.loads(out.read_text())
    assert naive["ran"] is False and naive["median_s"] is None
    assert naive["peak_bytes"] >= F * 32 * 256 * 256 and naive["peak_method"].startswith("computed")
    assert naive["traffic_bytes"] > 0 and "cannot run" in naive["reason"]
    assert sdpa["ran"] is True  # fused: O(S d), never planned out


@pytest.mark.slow  # roofline, runs, matplotlib: too slow for make test-fast
def test_time_budget_skips_and_says_so(tmp_path, no_roofline):
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


@pytest.mark.slow  # a subprocess that imports torch: too slow for make test-fast
def test_bad_argument_from_the_command_line():
    p = run(["scripts/bench.py", "--impl", "tiled,flash9"], timeout=120)
    assert p.returncode == 2
    assert "--impl flash9: unknown" in one_line_error(p)


@pytest.mark.slow
def test_replot_redraws_from_json_and_rejects_other_files(tmp_path, capsys):
    machine = {"cpu": "x", "threads": 2, "torch": "2", "matmul_gflops": 100.0}
    rows = [{"impl": "tiled", "seq": 1024, "ran": True, "median_s": 0.1, "peak_bytes": 3e7, "traffic_bytes": 9e8,
             **machine},  # (rows of a run before backward rows: no "direction", read as forward)
            {"impl": "naive", "seq": 1024, "ran": False, "median_s": None, "peak_bytes": 5e8, "traffic_bytes": 2e9,
             **machine},
            {"impl": "triton", "seq": 1024, "ran": True, "median_s": 40.0, "peak_bytes": 4e6, "traffic_bytes": 1.6e8,
             "time_method": "interpreted: not a kernel time", "direction": "forward", **machine},
            {"impl": "tiled", "seq": 1024, "ran": True, "median_s": 0.2, "peak_bytes": 6e7, "traffic_bytes": 2e9,
             "direction": "backward", "forward_state_bytes": 9e6, **machine}]  # fmt: skip
    src, png = tmp_path / "rows.json", tmp_path / "p.png"
    src.write_text(json.dumps(rows))
    assert report.main(["--replot", str(src), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"not": "rows"}')
    assert report.cli(["--replot", str(tmp_path / "bad.json"), "--plot", str(png)]) == 2
    assert "--replot" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------
# backward rows, triton rows, --device


@pytest.fixture
def no_roofline(monkeypatch):
    """The command line without its roofline measurement (seconds) and its 2 s of timed calls per row: these tests
    check what the rows say, never a time."""
    monkeypatch.setattr(meter, "roofline", lambda device=None, runs=10: {"matmul_gflops": 100.0,
                                                                         "matmul_shape": [1, 1, 1], "copy_gbps": 10.0})
    monkeypatch.setattr(bench_run, "MIN_TIMED_S", 0.0)


@pytest.mark.slow
def test_rows_say_their_direction_and_device(tmp_path, no_roofline):
    out = tmp_path / "b.json"
    assert report.main(["--seq", "128", "--impl", "tiled,sdpa", "--backward", "--runs", "1", "--json", str(out),
                        "--device", "cpu"]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["direction"]) for r in rows] == [
        (i, d) for d in ("forward", "backward") for i in ("tiled", "sdpa")
    ]
    for r in rows:
        assert r["device"] == "cpu" and r["ran"] and r["time_method"].startswith("measured")
        assert r["peak_bytes"] > 0 and r["traffic_bytes"] > 0 and r["traffic_method"].startswith("measured")
    fwd = {r["impl"]: r for r in rows if r["direction"] == "forward"}
    bwd = {r["impl"]: r for r in rows if r["direction"] == "backward"}
    for name in ("tiled", "sdpa"):
        assert bwd[name]["flops"] == 2 * fwd[name]["flops"]
        assert bwd[name]["forward_state_bytes"] >= F * 32 * 128 * 64  # at least the forward's output
        assert "forward_state_bytes" not in fwd[name]
    assert fwd["sdpa"]["backend"] and bwd["sdpa"]["backend"]  # the backend that actually ran


@pytest.mark.slow
def test_triton_traffic_counted_where_interpreted_closed_form_beyond(tmp_path, no_roofline):
    """On a CPU the Triton kernel runs in the interpreter: one call, its loads and stores counted, == the closed
    form; where one call would pass the interpreter's budget it is not run (no interpreted call is planned past
    it) and its traffic is the closed form, labelled."""
    out = tmp_path / "b.json"
    assert report.main(["--seq", "128,4096", "--impl", "triton", "--runs", "3", "--json", str(out)]) == 0
    small, big = json.loads(out.read_text())
    s = cases.shape_of(cases.llama_config())
    closed = cases.triton_traffic(s, 128)
    assert small["ran"] and small["runs"] == 1 and small["time_method"] == "interpreted: not a kernel time"
    assert small["traffic_method"] == "counted: Triton interpreter, global loads/stores"
    assert small["traffic_bytes"] == closed["load_bytes"] + closed["store_bytes"] == small["traffic_model_bytes"]
    assert small["traffic_count_equals_model"] is True and small["gflops"] is None
    assert small["peak_bytes"] == cases.triton_alloc(s, 128)  # its outputs, out and lse
    assert not big["ran"] and big["median_s"] is None and "interpreted" in big["reason"]
    closed = cases.triton_traffic(s, 4096)
    assert big["traffic_bytes"] == closed["load_bytes"] + closed["store_bytes"]
    assert big["traffic_method"].startswith("closed form") and big["peak_method"].startswith("computed")


def test_device_cuda_without_cuda_is_one_line_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert report.cli(["--device", "cuda", "--seq", "128", "--impl", "tiled"]) == 2
    assert "--device cuda" in one_line_error(capsys.readouterr().err)
    p = run(["scripts/bench.py", "--device", "cuda:0", "--quick"])
    assert p.returncode == 2 and "--device cuda:0" in one_line_error(p)
    assert report.cli(["--device", "bogus"]) == 2
    assert "--device bogus" in one_line_error(capsys.readouterr().err)


def test_what_each_option_runs():
    """--quick stays short: no interpreted triton, no backward rows; --backward adds naive, tiled, sdpa (or the
    --impl ones that have a backward case); --seq lets backward rows past 4096."""
    opt = report.options(report.parser().parse_args(["--quick"]))
    assert opt.seqs == (1024,) and opt.backward == () and opt.device == torch.device("cpu")
    assert "triton" not in opt.impls and "tiled" in opt.impls
    assert [j for j in bench_run.jobs(opt, 1024) if j[1] == "backward"] == []
    opt = report.options(report.parser().parse_args(["--backward"]))
    assert "triton" in opt.impls and opt.backward == ("naive", "tiled", "sdpa")
    assert ("tiled", "backward", None) in bench_run.jobs(opt, 4096)
    assert not [j for j in bench_run.jobs(opt, 16384) if j[1] == "backward"]
    opt = report.options(report.parser().parse_args(["--impl", "tiled,hf_eager,loop", "--backward", "--seq", "8192"]))
    assert opt.backward == ("tiled", "hf_eager") and ("tiled", "backward", None) in bench_run.jobs(opt, 8192)
    opt = report.options(report.parser().parse_args(["--impl", "tiled,layer_tiled", "--window", "512"]))
    assert bench_run.jobs(opt, 1024) == [("tiled", "forward", None), ("layer_tiled", "forward", None),
                                         ("tiled", "forward", 512)]  # fmt: skip


def test_windowed_cases_compute_transformers_windowed_attention():
    """--window W: the pairs counted as transformers' sliding_window W allows them, the additive mask given to
    transformers' functions equal to the one masking_utils builds, and every windowed core case (forward and
    backward) computing transformers' eager attention under that mask (whole tensors)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from harness.verify import kernel_hf

    for n, w in ((1, 1), (7, 1), (100, 17), (100, 100), (100, 300), (257, 64)):
        keep = kernel_hf.allowed(1, n, n, True, cases.band(w), None)  # (1, 1, n, n): masking_utils' window
        assert cases.pairs(n, w) == int(keep.sum()), (n, w)
        assert torch.equal(cases._bias(n, "cpu", w), kernel_hf.additive(keep, torch.float32)), (n, w)
    assert cases.pairs(100) == cases.pairs(100, 100) == 5050
    cfg = cases.llama_config()
    s = cases.shape_of(cfg)
    n, w = 200, 48
    for name in ("naive", "loop", "tiled", "sdpa", "hf_sdpa"):
        want = cases.make_case("hf_eager", s, n, cfg, seed=5, window=w).fn()  # (B, H, S, d)
        got = cases.make_case(name, s, n, cfg, seed=5, window=w).fn()
        err = float((got - want).abs().max())
        assert err < 1e-4, (name, err)
    full = cases.make_case("hf_eager", s, n, cfg, seed=5).fn()
    assert float((full - want).abs().max()) > 1e-2  # the window changes the answer at these sizes
    bias = cases._bias(n, "cpu", w)
    for name in ("tiled", "sdpa"):
        c = cases.make_case(name, s, n, cfg, seed=6, direction="backward", window=w)
        q, k, v, dout = c.inputs
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = eager_attention_forward(cases._module(s), q2, k2, v2, bias, scaling=s.d**-0.5)[0].transpose(1, 2)
        want = torch.autograd.grad(out, (q2, k2, v2), dout)
        for g, h in zip(c.fn(), want, strict=True):
            assert float((g - h).abs().max()) < 1e-4, name
    assert cases.core_flops(s, n, w) == 4 * s.H * s.d * cases.pairs(n, w)
    with pytest.raises(UserError, match="no windowed case"):
        cases.make_case("layer_tiled", s, 64, cfg, window=8)


def test_window_targets_ask_linear_growth_of_what_skips_outside_the_window():
    w = 512
    grow = cases.pairs(16384, w) / cases.pairs(4096, w)
    rows = [_row("tiled", 4096, window=w, median_s=1.0, traffic_bytes=1e9),
            _row("tiled", 16384, window=w, median_s=1.0 * grow, traffic_bytes=1e9 * grow),
            _row("tiled", 4096, median_s=2.0), _row("tiled", 16384, median_s=32.0),
            _row("sdpa", 4096, window=w, median_s=1.0), _row("sdpa", 16384, window=w, median_s=16.0)]  # fmt: skip
    goals = report.window_targets(rows)
    tiled = [t for t in goals if t["target"].startswith("tiled forward with a window of 512: time")]
    assert [t["met"] for t in tiled] == [True] and "full causal 16.00x" in tiled[0]["value"]
    assert [t["met"] for t in goals if t["target"].startswith("tiled forward with a window of 512: traffic")] == [True]
    assert [t["met"] for t in goals if t["target"].startswith("sdpa")] == [None]  # computes every pair: no target
    rows[1].median_s = 16.0  # quadratic: the window's blocks not skipped
    assert not [t for t in report.window_targets(rows) if "time" in t["target"] and "tiled" in t["target"]][0]["met"]


def test_backward_without_a_backward_case_is_one_line(capsys):
    assert report.cli(["--impl", "loop", "--backward"]) == 2
    assert "--backward" in one_line_error(capsys.readouterr().err)


def _row(impl, seq, direction="forward", **kw):
    r = bench_run.Row(impl, seq, ran=kw.pop("ran", True), direction=direction)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_targets_report_backward_and_naive_over_triton_traffic():
    rows = [_row("tiled", 4096, "backward", median_s=3.0, peak_bytes=60e6),
            _row("sdpa", 4096, "backward", median_s=2.0, peak_bytes=80e6),
            _row("naive", 1024, traffic_bytes=2e9), _row("triton", 1024, traffic_bytes=1e8,
                                                          traffic_method="counted: Triton interpreter, ..."),
            _row("naive", 16384, ran=False, traffic_bytes=4e11), _row("triton", 16384, ran=False, traffic_bytes=4e10,
                                                                       traffic_method="closed form ...")]  # fmt: skip
    goals = {t["target"]: t for t in report.targets(rows)}
    time_goal = goals["tiled backward time <= 1.5x sdpa backward at 4096"]
    assert time_goal["met"] is True and time_goal["value"].startswith("1.50x")
    peak_goal = goals["tiled backward peak memory <= 2x sdpa backward at 4096"]
    assert peak_goal["met"] is True and peak_goal["value"].startswith("0.75x")
    rows[0].median_s = 3.1
    assert not {t["target"]: t for t in report.targets(rows)}[time_goal["target"]]["met"]
    (ratio,) = [t for t in goals.values() if t["target"].startswith("traffic naive")]
    assert ratio["met"] is None
    assert ratio["value"] == ("1024: 2 GB / 100 MB (counted) = 20.0x; "
                              "16384: 400 GB (computed) / 40 GB (closed form) = 10.0x")


def test_generated_block_of_the_docs_page(tmp_path):
    rows = [_row("tiled", 1024, median_s=0.1, min_s=0.09, max_s=0.2, gflops=50.0, frac_matmul=0.4, peak_bytes=3e7,
                 peak_method="measured: VmHWM - VmRSS", traffic_bytes=1e9, traffic_method="measured: aten ..."),
            _row("triton", 1024, median_s=40.0, min_s=40.0, max_s=40.0, time_method="interpreted: not a kernel time",
                 peak_bytes=4e6, peak_method="measured: tensor bytes", traffic_bytes=1.6e8,
                 traffic_method="counted: Triton interpreter, global loads/stores"),
            _row("naive", 4096, "backward", ran=False, peak_bytes=1e10, peak_method="computed: ...",
                 traffic_bytes=5e10, traffic_method="computed: ...", reason="needs 20 GB")]  # fmt: skip
    info = {"machine": {"cpu": "x", "threads": 2, "torch": "2", "device": "cpu"},
            "roofline": {"matmul_gflops": 100.0, "copy_gbps": 10.0}}  # fmt: skip
    text = report.markdown(rows, info, [{"target": "t", "value": "1.1x", "met": False}])
    assert "| `triton` | forward | 1024 | 40 s (1 call, interpreted: not a kernel time) |" in text
    assert "| 160 MB (counted) |" in text and "| 10 GB (computed) | 50 GB (computed) | needs 20 GB |" in text
    assert "- t: 1.1x (**MISSED**)" in text
    page = tmp_path / "bench.md"
    page.write_text("# x\n<!-- generated by: scripts/bench.py -->\nold\n<!-- end generated -->\nafter\n")
    report._check_generated_block(page)
    update_generated(page, text)
    assert "old" not in page.read_text() and "after" in page.read_text() and "`triton`" in page.read_text()
    with pytest.raises(UserError):
        report._check_generated_block(tmp_path / "missing.md")
    assert report.cli(["--seq", "128", "--impl", "tiled", "--doc", str(tmp_path / "missing.md")]) == 2  # before any run
