"""Measure every planned configuration: the memory call under the meter (also the warm-up), then timed calls.

    for each seq, for each (implementation, direction): plan (plan.py) -> inputs (cases.py) -> measure (meter.py)
    -> a Row

A backward row times the gradient call alone (its forward state and output gradient are made with its inputs). On
a CPU the Triton kernel runs in Triton's interpreter: one call at most, under kernel_traffic's counter (its exact
global loads and stores); that call's time is the interpreter's, labelled so, never a kernel time.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from harness.bench import meter
from harness.bench.cases import CORE, INTERPRETED, LAYER, Case, flops_of, llama_config, make_case, shape_of
from harness.bench.kernel_traffic import count
from harness.bench.meter import CPU, Meter, clock_for, human, meter_call, status, timed, trim
from harness.bench.plan import TRAFFIC_CLOSED_FORM, TRAFFIC_COUNTED, Computed, plan
from impl import sdpa

SEQS = (1024, 4096, 16384, 32768)
QUICK_SEQS = (1024,)
LAYER_MAX_SEQ = 4096  # whole-layer rows at seqs up to this (the core dominates beyond)
BACKWARD_MAX_SEQ = 4096  # backward rows at seqs up to this, unless --seq names the seqs
MIN_TIMED_S = 2.0  # time at least this much per configuration (more runs for short calls)
WARM_SEQ = 256  # each code path's first call (lazy initialisation) at this seq, or the run's smallest
MAX_INTERPRETED_S = 120.0  # default of --max-interpreted-s: one interpreted call projected longer is not run
TIME_INTERPRETED = "interpreted: not a kernel time"
DIR = {"forward": "fwd", "backward": "bwd"}  # the printed table's direction column


# ---------------------------------------------------------------------------------------------------------
# measuring one (implementation, seq, direction)


@dataclass
class Row:
    impl: str
    seq: int
    ran: bool
    direction: str = "forward"  # "forward", or "backward": the gradient call alone
    window: int | None = None  # each query sees its last `window` keys (transformers' sliding_window); None: all
    median_s: float | None = None
    peak_bytes: int | None = None
    traffic_bytes: int | None = None
    min_s: float | None = None
    max_s: float | None = None
    runs: int = 0
    flops: float = 0.0
    gflops: float | None = None
    frac_matmul: float | None = None
    time_method: str = ""
    peak_method: str = ""
    tensor_peak_bytes: int | None = None
    traffic_method: str = ""
    aten_ops: int | None = None
    reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The implementation, and its window when it has one: 'tiled w512'."""
        return self.impl if self.window is None else f"{self.impl} w{self.window}"

    def json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def measure(case: Case, runs: int, hwm: bool, device: torch.device = CPU) -> tuple[list[float], int, Meter]:
    """The memory call (under the meter; it is also the warm-up for this shape), then `runs` timed calls.

    Peak: on a CUDA device torch.cuda's peak of allocated bytes during the call; on a CPU the resident-set
    high-water mark (hwm) or, where it cannot be reset, the meter's tensor bytes. Inputs (and a backward case's
    forward state) are excluded: they exist before the call."""
    trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = status("VmRSS") if hwm else 0
        if hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
    counts, out = meter_call(case.fn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = status("VmHWM") - base if hwm else counts.tensor_peak
    del out
    trim()
    with torch.no_grad():
        times = timed(case.fn, runs, min_s=MIN_TIMED_S, clock=clock_for(device))
    return times, peak, counts


def measure_interpreted(case: Case) -> tuple[float, Meter, object]:
    """One call of a Triton kernel in the interpreter, under kernel_traffic's counter: (seconds, the meter, the
    counted Traffic). The counter sees every global load and store of the kernel, masked lanes excluded."""
    trim()
    with count() as traffic:
        t0 = time.perf_counter()
        counts, out = meter_call(case.fn)
        seconds = time.perf_counter() - t0
    del out
    return seconds, counts, traffic


def _warm(name: str, direction: str, s, n: int, cfg: dict, device: torch.device, window: int | None = None
          ) -> tuple[int, float]:  # fmt: skip
    """The first call of a code path (imports, kernel compilation or rewriting, the meter), at a small seq:
    (seq, seconds), the base from which an interpreted call is projected."""
    w = min(WARM_SEQ, n)
    case = make_case(name, s, w, cfg, device=device, direction=direction, window=window)
    t0 = time.perf_counter()
    meter_call(case.fn)
    return w, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Options:
    seqs: tuple[int, ...] = SEQS
    impls: tuple[str, ...] = CORE + LAYER
    runs: int = 5
    max_config_s: float = 600.0  # a configuration projected to take longer (all its calls) is not run
    mem_fraction: float = 0.85  # run only if the computed peak fits in this fraction of the free memory
    layer_any_seq: bool = False  # whole-layer rows above LAYER_MAX_SEQ too (when asked for by name)
    backward: tuple[str, ...] = ()  # implementations with backward rows (--backward: BACKWARD_ROWS)
    backward_any_seq: bool = False  # backward rows above BACKWARD_MAX_SEQ too (when --seq names the seqs)
    device: torch.device = CPU
    max_interpreted_s: float = MAX_INTERPRETED_S
    window: int | None = None  # also the core rows with this window (keys each query sees), beside full causal


def jobs(opt: Options, n: int) -> list[tuple[str, str, int | None]]:
    """(implementation, direction, window) at seq n, in the order they run: the forward rows (full causal, then
    windowed), then the backward rows (the same)."""
    fwd = [(name, "forward", None) for name in opt.impls
           if name not in LAYER or n <= LAYER_MAX_SEQ or opt.layer_any_seq]  # fmt: skip
    bwd = [(name, "backward", None) for name in opt.backward] if n <= BACKWARD_MAX_SEQ or opt.backward_any_seq else []
    if opt.window is not None:
        fwd += [(name, "forward", opt.window) for name, _, _ in fwd if name in CORE]
        bwd += [(name, "backward", opt.window) for name, _, _ in bwd]
    return fwd + bwd


def run(opt: Options, log=None) -> tuple[list[Row], dict]:
    log = log or functools.partial(print, flush=True)
    dev = opt.device
    if dev.type == "cuda" and dev.index is None:  # memory statistics and events need the device's index
        dev = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        return _run(opt, dev, log)


def _run(opt: Options, dev: torch.device, log) -> tuple[list[Row], dict]:
    cfg = llama_config()
    s = shape_of(cfg)
    hwm = dev.type == "cpu" and meter.can_reset_hwm()
    info = {"machine": meter.machine(dev), "roofline": meter.roofline(dev)}
    peak_rate = info["roofline"]["matmul_gflops"]
    m = info["machine"]
    on = f"{m['gpu']} ({dev})" if dev.type == "cuda" else f"{m['cpu']}, {m['threads']} threads"
    log(f"machine: {on}, {human(m['ram_bytes'])} RAM, torch {torch.__version__}")
    log(
        f"roofline: float32 matmul {peak_rate:.1f} GFLOP/s ({'x'.join(map(str, info['roofline']['matmul_shape']))}), "
        f"copy {info['roofline']['copy_gbps']:.1f} GB/s"
    )
    clock = "CUDA events" if dev.type == "cuda" else "wall clock"
    log(
        f"shapes: B={s.B} H={s.H} Hkv={s.Hkv} d={s.d} D={s.D}, causal"
        f"{'' if opt.window is None else f' (and a window of {opt.window} keys: rows named w{opt.window})'}"
        f", float32; time: median of >= {opt.runs} "
        f"calls (more until {MIN_TIMED_S:g} s) after a warm-up call, {clock}; bwd: the gradient call alone"
    )
    peak_how = ("torch.cuda.max_memory_allocated during the call" if dev.type == "cuda"
                else "resident-set high-water mark of the call (VmHWM)" if hwm else "tensor bytes (no VmHWM here)")
    log(f"peak memory: {peak_how}; traffic: bytes read + written at aten op boundaries (triton: its global loads "
        "and stores)")  # fmt: skip
    log(f"{'impl':12s} {'dir':3s} {'seq':>6s} {'median':>9s} {'min..max':>17s} {'GFLOP/s':>8s} {'%mm':>5s} "
        f"{'peak':>10s} {'traffic':>10s}  status")

    rows: list[Row] = []
    last: dict[tuple, tuple[int, float]] = {}  # (impl, direction, window) -> (seq, seconds) of its largest run
    warmed: set[tuple] = set()
    for n in sorted(opt.seqs):
        for name, direction, window in jobs(opt, n):
            key = (name, direction, window)
            interpreted = name in INTERPRETED and dev.type != "cuda"
            if interpreted and key not in warmed:  # an interpreted call is projected from a measured one
                last[key] = _warm(name, direction, s, n, cfg, dev, window)
                warmed.add(key)
            row = Row(name, n, ran=False, direction=direction, window=window,
                      flops=flops_of(name, s, n, direction, window))  # fmt: skip
            row.reason, pred = plan(name, s, n, cfg, last.get(key), calls=opt.runs + 1, max_s=opt.max_config_s,
                                    mem_fraction=opt.mem_fraction, direction=direction, device=dev,
                                    interpreted=interpreted, max_interpreted_s=opt.max_interpreted_s,
                                    window=window)  # fmt: skip
            if name in INTERPRETED:
                row.extra["traffic_model_bytes"] = pred.traffic
            if row.reason:
                _computed(row, pred)
                rows.append(row)
                log(f"{row.label:12s} {DIR[direction]:3s} {n:6d} {'-':>9s} {'':>17s} {'':>8s} {'':>5s} "
                    f"{human(row.peak_bytes):>10s} {human(row.traffic_bytes):>10s}  not run: {row.reason}")
                continue
            if key not in warmed:  # first call of this code path (and of the meter): lazy initialisation
                _warm(name, direction, s, n, cfg, dev, window)
                warmed.add(key)
            case = make_case(name, s, n, cfg, device=dev, seed=n, direction=direction, window=window)
            if interpreted:
                _interpreted(row, case, pred)
            else:
                _measured(row, case, pred, opt.runs, hwm, dev, peak_rate)
            if name == "sdpa":
                row.extra["backend"] = sdpa.last_backend  # the backend that ran (the backward uses its pair)
            if direction == "backward":
                row.extra["forward_state_bytes"] = case.held
            del case
            trim()
            last[key] = (n, row.median_s)
            rows.append(row)
            if interpreted:
                agree = "== closed form" if row.traffic_bytes == pred.traffic else "!= closed form: CHECK"
                log(f"{row.label:12s} {DIR[direction]:3s} {n:6d} {row.median_s:8.1f}s {'(1 call)':>17s} {'':>8s} "
                    f"{'':>5s} {human(row.peak_bytes):>10s} {human(row.traffic_bytes):>10s}  ran, {TIME_INTERPRETED}"
                    f"; traffic counted ({agree})")  # fmt: skip
            else:
                log(f"{row.label:12s} {DIR[direction]:3s} {n:6d} {row.median_s:8.3f}s "
                    f"{row.min_s:7.3f}..{row.max_s:7.3f}s {row.gflops:8.1f} {100 * row.frac_matmul:4.0f}% "
                    f"{human(row.peak_bytes):>10s} "
                    f"{human(row.traffic_bytes):>10s}  ran")  # fmt: skip
    for r in rows:
        r.extra.update(dtype="float32", B=s.B, H=s.H, Hkv=s.Hkv, d=s.d, causal=True, device=str(dev))
    return rows, info


def _computed(row: Row, pred: Computed | None) -> None:
    """A row that cannot run here: its computed bytes, labelled (the fused cases are never too big, only too
    slow: nothing computed for them)."""
    if pred is None:
        return
    row.peak_bytes, row.tensor_peak_bytes, row.peak_method = pred.tensor_peak, pred.tensor_peak, pred.peak_method
    row.traffic_bytes, row.aten_ops, row.traffic_method = pred.traffic, pred.ops, pred.traffic_method
    if pred.held:
        row.extra["forward_state_bytes"] = pred.held


def _measured(row: Row, case: Case, pred: Computed | None, runs: int, hwm: bool, dev: torch.device,
              peak_rate: float) -> None:  # fmt: skip
    times, peak, counts = measure(case, runs, hwm, dev)
    med = statistics.median(times)
    row.ran, row.median_s, row.min_s, row.max_s, row.runs = True, med, min(times), max(times), len(times)
    row.time_method = f"measured: median of {len(times)} calls, " + ("CUDA events" if dev.type == "cuda"
                                                                    else "wall clock")  # fmt: skip
    row.gflops = row.flops / med / 1e9
    row.frac_matmul = row.gflops / peak_rate
    row.peak_bytes, row.tensor_peak_bytes = peak, counts.tensor_peak
    row.peak_method = ("measured: torch.cuda.max_memory_allocated - memory_allocated before" if dev.type == "cuda"
                       else "measured: VmHWM - VmRSS" if hwm else "measured: tensor bytes (dispatch mode)")  # fmt: skip
    if row.impl in INTERPRETED:  # compiled: one launch per kernel, invisible at aten op boundaries
        row.traffic_bytes, row.traffic_method = pred.traffic, TRAFFIC_CLOSED_FORM
    else:
        row.traffic_bytes, row.aten_ops = counts.traffic, counts.ops
        row.traffic_method = f"measured: aten op boundaries, {dev.type} run"


def _interpreted(row: Row, case: Case, pred: Computed) -> None:
    seconds, counts, counted = measure_interpreted(case)
    row.ran, row.median_s, row.min_s, row.max_s, row.runs = True, seconds, seconds, seconds, 1
    row.time_method = TIME_INTERPRETED
    row.peak_bytes = row.tensor_peak_bytes = counts.tensor_peak
    row.peak_method = "measured: tensor bytes (dispatch mode): the kernel's outputs; the interpreter's buffers excluded"
    row.traffic_bytes, row.traffic_method = counted.total_bytes, TRAFFIC_COUNTED
    row.extra.update(load_bytes=counted.load_bytes, store_bytes=counted.store_bytes,
                     traffic_count_equals_model=counted.total_bytes == pred.traffic)  # fmt: skip
