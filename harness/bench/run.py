"""Measure every planned configuration: the memory call under the meter (also the warm-up), then timed calls.

    for each seq, for each implementation: plan (plan.py) -> inputs (cases.py) -> measure (meter.py) -> a Row
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field

import torch

from harness.bench.cases import CORE, LAYER, Case, flops_of, llama_config, make_case, shape_of
from harness.bench.meter import Meter, _can_reset_hwm, _status, _timed, _trim, human, machine, meter_call, roofline
from harness.bench.plan import plan

SEQS = (1024, 4096, 16384, 32768)
QUICK_SEQS = (1024,)
LAYER_MAX_SEQ = 4096  # whole-layer rows at seqs up to this (the core dominates beyond)
MIN_TIMED_S = 2.0  # time at least this much per configuration (more runs for short calls)


# ---------------------------------------------------------------------------------------------------------
# measuring one (implementation, seq)


@dataclass
class Row:
    impl: str
    seq: int
    ran: bool
    median_s: float | None = None
    peak_bytes: int | None = None
    traffic_bytes: int | None = None
    min_s: float | None = None
    max_s: float | None = None
    runs: int = 0
    flops: float = 0.0
    gflops: float | None = None
    frac_matmul: float | None = None
    peak_method: str = ""
    tensor_peak_bytes: int | None = None
    traffic_method: str = ""
    aten_ops: int | None = None
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def measure(case: Case, runs: int, hwm: bool) -> tuple[list[float], int, Meter]:
    """The memory call (under the meter; it is also the warm-up for this shape), then `runs` timed calls."""
    _trim()
    base = _status("VmRSS") if hwm else 0
    if hwm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
    meter, out = meter_call(case.fn)
    peak = _status("VmHWM") - base if hwm else meter.tensor_peak
    del out
    _trim()
    with torch.no_grad():
        times = _timed(case.fn, runs, min_s=MIN_TIMED_S)
    return times, peak, meter


# ---------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    seqs: tuple[int, ...] = SEQS
    impls: tuple[str, ...] = CORE + LAYER
    runs: int = 5
    max_config_s: float = 600.0  # a configuration projected to take longer (all its calls) is not run
    mem_fraction: float = 0.85  # run only if the computed peak fits in this fraction of the free RAM
    layer_any_seq: bool = False  # whole-layer rows above LAYER_MAX_SEQ too (when asked for by name)


def run(opt: Options, log=None) -> tuple[list[Row], dict]:
    log = log or functools.partial(print, flush=True)
    cfg = llama_config()
    s = shape_of(cfg)
    hwm = _can_reset_hwm()
    info = {"machine": machine(), "roofline": roofline()}
    peak_rate = info["roofline"]["matmul_gflops"]
    log(
        f"machine: {info['machine']['cpu']}, {info['machine']['threads']} threads, "
        f"{human(info['machine']['ram_bytes'])} RAM, torch {torch.__version__}"
    )
    log(
        f"roofline: float32 matmul {peak_rate:.1f} GFLOP/s ({'x'.join(map(str, info['roofline']['matmul_shape']))}), "
        f"copy {info['roofline']['copy_gbps']:.1f} GB/s"
    )
    log(
        f"shapes: B={s.B} H={s.H} Hkv={s.Hkv} d={s.d} D={s.D}, causal, float32; time: median of >= {opt.runs} "
        f"calls (more until {MIN_TIMED_S:g} s) after a warm-up call"
    )
    log(
        f"peak memory: {'resident-set high-water mark of the call (VmHWM)' if hwm else 'tensor bytes (no VmHWM here)'}"
        "; traffic: bytes read + written at aten op boundaries"
    )
    log(f"{'impl':12s} {'seq':>6s} {'median':>9s} {'min..max':>17s} {'GFLOP/s':>8s} {'%mm':>5s} "
        f"{'peak':>10s} {'traffic':>10s}  status")

    rows: list[Row] = []
    last: dict[str, tuple[int, float]] = {}  # impl -> (seq, median) of its largest run so far, to project time
    warmed: set[str] = set()
    for n in sorted(opt.seqs):
        for name in opt.impls:
            if name in LAYER and n > LAYER_MAX_SEQ and not opt.layer_any_seq:
                continue
            row = Row(name, n, ran=False)
            row.reason, pred = plan(name, s, n, cfg, last.get(name), calls=opt.runs + 1, max_s=opt.max_config_s,
                                    mem_fraction=opt.mem_fraction)  # fmt: skip
            if row.reason:
                row.flops = flops_of(name, s, n)
                if pred is not None:  # (the fused cases are never too big, only too slow: nothing computed)
                    row.peak_bytes, row.tensor_peak_bytes = pred.tensor_peak, pred.tensor_peak
                    row.peak_method = "computed: tensor bytes of a meta-device run"
                    row.traffic_bytes, row.aten_ops = pred.traffic, pred.ops
                    row.traffic_method = "computed: aten op boundaries, meta-device run"
                rows.append(row)
                log(f"{name:12s} {n:6d} {'-':>9s} {'':>17s} {'':>8s} {'':>5s} {human(row.peak_bytes):>10s} "
                    f"{human(row.traffic_bytes):>10s}  not run: {row.reason}")
                continue
            if name not in warmed:  # first call of this code path (and of the meter): lazy initialisation
                meter_call(make_case(name, s, 256, cfg).fn)
                warmed.add(name)
            case = make_case(name, s, n, cfg, seed=n)
            times, peak, meter = measure(case, opt.runs, hwm)
            if name == "sdpa":
                from impl import sdpa

                row.extra["backend"] = sdpa.last_backend
            del case
            _trim()
            med = statistics.median(times)
            row.ran, row.median_s, row.min_s, row.max_s, row.runs = True, med, min(times), max(times), len(times)
            row.flops = flops_of(name, s, n)
            row.gflops = row.flops / med / 1e9
            row.frac_matmul = row.gflops / peak_rate
            row.peak_bytes, row.tensor_peak_bytes = peak, meter.tensor_peak
            row.peak_method = "measured: VmHWM - VmRSS" if hwm else "measured: tensor bytes (dispatch mode)"
            row.traffic_bytes, row.aten_ops = meter.traffic, meter.ops
            row.traffic_method = "measured: aten op boundaries, cpu run"
            last[name] = (n, med)
            rows.append(row)
            log(f"{name:12s} {n:6d} {med:8.3f}s {row.min_s:7.3f}..{row.max_s:7.3f}s {row.gflops:8.1f} "
                f"{100 * row.frac_matmul:4.0f}% {human(peak):>10s} {human(meter.traffic):>10s}  ran")
    for r in rows:
        r.extra.update(dtype="float32", B=s.B, H=s.H, Hkv=s.Hkv, d=s.d, causal=True, device="cpu")
    return rows, info
