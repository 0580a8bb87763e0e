"""Benchmarks (`make bench`, scripts/bench.py): time, peak memory and memory traffic of attention on
Llama-3.2-1B's shapes (32 query heads, 8 KV heads, head_dim 64, batch 1, causal, float32).

The pipeline, top to bottom:
  machine   the roofline: this machine's float32 matmul rate and copy bandwidth, measured in the same run
  cases     one call per implementation on the same q, k, v (projected and rotated once, outside the timing):
            naive, loop, tiled, sdpa (ours) and transformers' eager and sdpa attention functions (anchors);
            plus the whole layer (projections included) for tiled and for transformers' LlamaAttention
  plan      can it run here? Its tensor peak is first computed by running it on the meta device (no data,
            no memory): above the free RAM, or projected past the time budget, it is not run, and its
            computed bytes are reported, labelled as computed
  measure   peak memory: the resident-set high-water mark of the call (/proc/self/status VmHWM, reset through
            /proc/self/clear_refs), which sees every allocation, kernels' scratch included;
            traffic: the bytes every aten op reads and writes (a TorchDispatchMode; views move nothing), what a
            GPU moves through HBM when each op is its own kernel;
            time: median and spread of `runs` timed calls after the memory call (which is the warm-up)
  report    the table, the targets, rows as JSON, docs/bench.png
"""

from __future__ import annotations

import ctypes
import functools
import gc
import io
import json
import math
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from harness.errors import Parser, UserError, run_cli
from harness.output import write_atomic, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "fixtures" / "llama-3.2-1b" / "config.json"
SEQS = (1024, 4096, 16384, 32768)
QUICK_SEQS = (1024,)
CORE = ("naive", "loop", "tiled", "sdpa", "hf_eager", "hf_sdpa")
LAYER = ("layer_tiled", "layer_hf")
LAYER_MAX_SEQ = 4096  # whole-layer rows at seqs up to this (the core dominates beyond)
# Not planned on the meta device: sdpa is one fused kernel on CPU but decomposes on meta (an S x S prediction
# for a call that needs O(S d)); the tiled layer reads position values (rope tables). Both need O(S d) memory.
NO_PREDICT = {"sdpa", "hf_sdpa", "layer_hf", "layer_tiled"}
H100_SMEM = 227 * 1024  # bytes of shared memory one thread block may use on an H100 SM: the tile budget M
DOCS_JSON, DOCS_PNG = ROOT / "docs" / "bench.json", ROOT / "docs" / "bench.png"
MIN_TIMED_S = 2.0  # time at least this much per configuration (more runs for short calls)


# ---------------------------------------------------------------------------------------------------------
# shapes and FLOPs


@dataclass(frozen=True)
class Shape:
    H: int  # query heads
    Hkv: int  # key/value heads
    d: int  # head dim
    D: int  # hidden size
    B: int = 1


def llama_config(path: Path = CONFIG) -> dict:
    return json.loads(Path(path).read_text())


def shape_of(cfg: dict) -> Shape:
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return Shape(cfg["num_attention_heads"], cfg["num_key_value_heads"], d, cfg["hidden_size"])


def core_flops(s: Shape, n: int) -> float:
    """Useful FLOPs of causal attention: q k^T and p v (2 d each) over the n (n + 1) / 2 allowed pairs per head.
    The same count for every implementation, so GFLOP/s compares time (naive computes the masked half too)."""
    return 4.0 * s.B * s.H * s.d * n * (n + 1) / 2


def flops_of(name: str, s: Shape, n: int) -> float:
    return core_flops(s, n) if name in CORE else layer_flops(s, n)


def layer_flops(s: Shape, n: int) -> float:
    proj = 2.0 * s.B * n * s.D * (s.H + 2 * s.Hkv) * s.d + 2.0 * s.B * n * s.H * s.d * s.D  # q, k, v and o
    return core_flops(s, n) + proj


def io_model(s: Shape, n: int, *, sram: int = H100_SMEM, elsize: int = 4) -> tuple[float, float]:
    """HBM bytes of the FlashAttention paper's IO analysis (non-causal, per query head, times H):
    standard attention (Algorithm 0): read Q, K (2Nd), write S (N^2); read S, write P (2N^2); read P, V, write O
    (N^2 + 2Nd): 4Nd + 4N^2 = Theta(Nd + N^2). FlashAttention (Algorithm 1, Theorem 2): K, V read once (2Nd); for
    each of Tc = N / Bc key blocks, Bc = ceil(M / 4d), Q and O read and O written (3Nd) plus l, m (4N):
    Theta(N^2 d^2 / M) for on-chip memory M (in elements)."""
    M = sram // elsize
    bc = math.ceil(M / (4 * s.d))
    naive = 4 * n * s.d + 4 * n * n
    tiled = 2 * n * s.d + math.ceil(n / bc) * (3 * n * s.d + 4 * n)
    return float(naive * s.H * s.B * elsize), float(tiled * s.H * s.B * elsize)


# ---------------------------------------------------------------------------------------------------------
# the machine: roofline and memory


def _timed(fn: Callable, runs: int, min_s: float = 0.0, cap: int = 50) -> list[float]:
    """At least `runs` timed calls, more (up to `cap`) until they add up to `min_s`: short calls are noisy."""
    ts: list[float] = []
    while len(ts) < runs or (sum(ts) < min_s and len(ts) < cap):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def roofline(n: int = 2048, runs: int = 10) -> dict:
    """Measured float32 matmul rate (GFLOP/s, n x n @ n x n) and copy bandwidth (GB/s, 256 MB read + written)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    t_mm = statistics.median(_timed(lambda: a @ b, runs))
    src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    dst.copy_(src)
    t_cp = statistics.median(_timed(lambda: dst.copy_(src), runs))
    return {
        "matmul_gflops": 2 * n**3 / t_mm / 1e9,
        "matmul_shape": [n, n, n],
        "copy_gbps": 2 * src.nbytes / t_cp / 1e9,
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": "cpu",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_bytes": _meminfo("MemTotal"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


_libc = None


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a call that reuses them shows in its RSS."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------------------
# the meter: traffic at aten op boundaries, and the live bytes of the tensors a call creates


def nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing t: broadcast (stride-0) dimensions are one element, not many."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_"}  # write self without reading it


class Meter(TorchDispatchMode):
    """Sums, over every aten op, the bytes of its tensor inputs (read) and outputs (written) -> `traffic`.

    Views (outputs sharing an input's storage, op not in place) move nothing and count zero; in-place ops read
    and write self; copy_/fill_ and out= arguments are written, not read; empty() allocates and writes nothing.
    Also tracks the storages created inside (freed when Python drops them) -> `tensor_peak`: the most bytes of
    tensors alive at once, inputs excluded. It sees tensors only (not kernels' internal scratch), which is why the
    measured peak is the RSS high-water mark and this is the computed one, for calls that cannot run.
    """

    def __init__(self):
        super().__init__()
        self.traffic = 0
        self.ops = 0
        self.live = 0
        self.tensor_peak = 0
        self._new: dict[int, int] = {}  # storage -> bytes, for storages created inside
        self._old: set[int] = set()  # storages that existed before (inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in ins:
            key = t.untyped_storage()._cdata
            if key not in self._new:
                self._old.add(key)
        in_keys = {t.untyped_storage()._cdata for t in ins}
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not mutates and outs and all(t.untyped_storage()._cdata in in_keys for t in outs):
            return out  # a view: no data moves
        self.ops += 1
        dest = {id(t) for t in pytree.tree_leaves(kwargs.get("out")) if isinstance(t, torch.Tensor)}
        if name in _OVERWRITE and ins:
            dest.add(id(args[0]))
        self.traffic += sum(nbytes(t) for t in ins if id(t) not in dest)
        if name not in _ALLOC_ONLY:
            self.traffic += sum(nbytes(t) for t in outs)
        for t in outs:
            self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._new or key in self._old:
            return
        n = st.nbytes()
        self._new[key] = n
        self.live += n
        self.tensor_peak = max(self.tensor_peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._new.pop(key, 0)


# ---------------------------------------------------------------------------------------------------------
# the cases: name -> (seq, device) -> a no-argument call on prepared inputs


@dataclass
class Case:
    name: str
    fn: Callable[[], object]  # the call that is measured
    flops: float


def _module(s: Shape):
    """What transformers' attention functions read off the attention module."""
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal, m.layer_idx = s.H // s.Hkv, True, 0
    return m.eval()


def make_case(name: str, s: Shape, n: int, cfg: dict, device: str = "cpu", seed: int = 0) -> Case:
    """Inputs for `name` at seq n, made here (outside the timing), and the call on them."""
    from impl import CORES, tiled

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return (torch.randn(*shape, generator=g) * std).to(device)

    if name in LAYER:
        x = rand(s.B, n, s.D)
        w = {
            "q_proj": rand(s.H * s.d, s.D, std=0.02),
            "k_proj": rand(s.Hkv * s.d, s.D, std=0.02),
            "v_proj": rand(s.Hkv * s.d, s.D, std=0.02),
            "o_proj": rand(s.D, s.H * s.d, std=0.02),
        }
        pos = torch.arange(n, device=device)[None].expand(s.B, n)
        if name == "layer_tiled":
            return Case(name, lambda: tiled.attention(x, w, config=cfg, position_ids=pos), layer_flops(s, n))
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        conf = LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}, attn_implementation="sdpa")
        with torch.device(device):
            attn = LlamaAttention(conf, layer_idx=0).eval()
            cos, sin = LlamaRotaryEmbedding(conf)(x, pos)  # computed once per forward, shared by all layers
        attn.load_state_dict({f"{k}.weight": t for k, t in w.items()})

        def hf_layer():
            with torch.no_grad():
                return attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]

        return Case(name, hf_layer, layer_flops(s, n))

    q, k, v = rand(s.B, s.H, n, s.d), rand(s.B, s.Hkv, n, s.d), rand(s.B, s.Hkv, n, s.d)
    flops = core_flops(s, n)
    if name in CORES:
        core = CORES[name]
        return Case(name, lambda: core(q, k, v), flops)
    if name == "hf_eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        # eager is not causal by itself: the additive mask transformers builds for it, an input here
        bias = torch.full((n, n), torch.finfo(torch.float32).min, device=device).triu_(1)[None, None]
        m = _module(s)
        return Case(name, lambda: eager_attention_forward(m, q, k, v, bias, scaling=s.d**-0.5)[0], flops)
    if name == "hf_sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        m = _module(s)
        return Case(name, lambda: sdpa_attention_forward(m, q, k, v, None, scaling=s.d**-0.5)[0], flops)
    raise UserError(f"unknown implementation {name!r}: choose from {', '.join(CORE + LAYER)}")


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


def meter_call(fn: Callable) -> tuple[Meter, object]:
    with torch.no_grad(), Meter() as m:
        out = fn()
    return m, out


def predict(name: str, s: Shape, n: int, cfg: dict) -> Meter:
    """Run on the meta device: shapes only, no data and no memory. Gives tensor peak and traffic."""
    m, out = meter_call(make_case(name, s, n, cfg, device="meta").fn)
    del out
    return m


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


def human(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b:.0f} B"


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
            # plan: memory (computed on meta) and time (projected from the last seq, O(n^2))
            pred = None if name in NO_PREDICT else predict(name, s, n, cfg)
            free = _meminfo("MemAvailable") or 0
            calls = opt.runs + 1  # at least: the memory call and the timed runs
            if pred is not None and pred.tensor_peak > opt.mem_fraction * free:
                row.reason = (
                    f"needs {human(pred.tensor_peak)} of tensors (computed), "
                    f"{human(free)} free: cannot run on this machine"
                )
            elif name in last:
                n0, t0 = last[name]
                projected = t0 * (n / n0) ** 2 * calls
                if projected > opt.max_config_s:
                    row.reason = (
                        f"projected {projected:.0f} s for {calls} calls > --max-config-s {opt.max_config_s:g}"
                    )
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


# ---------------------------------------------------------------------------------------------------------
# targets and report


def _get(rows: list[Row], impl: str, seq: int) -> Row | None:
    return next((r for r in rows if r.impl == impl and r.seq == seq), None)


def targets(rows: list[Row]) -> list[dict]:
    """The issue's targets, evaluated on this run's rows (absent when the run did not cover them)."""
    out = []
    t, p = _get(rows, "tiled", 4096), _get(rows, "sdpa", 4096)
    if t and p and t.ran and p.ran:
        r = t.median_s / p.median_s
        out.append({"target": "tiled time <= 1.25x sdpa at 4096", "value": f"{r:.2f}x", "met": r <= 1.25})
    t, p = _get(rows, "tiled", 16384), _get(rows, "sdpa", 16384)
    if t and p and t.ran and p.ran:
        r = t.peak_bytes / p.peak_bytes
        out.append({"target": "tiled peak memory <= 2x sdpa at 16384", "value": f"{r:.2f}x", "met": r <= 2})
    t = _get(rows, "tiled", 32768)
    if t:
        out.append({"target": "tiled runs 32768 tokens here", "value": "ran" if t.ran else "not run", "met": t.ran})
    t, nv, p = _get(rows, "tiled", 4096), _get(rows, "naive", 4096), _get(rows, "sdpa", 4096)
    if t and nv and p:
        out.append({
            "target": "traffic at 4096 (aten op boundaries): tiled / naive, sdpa / naive",
            "value": f"{t.traffic_bytes / nv.traffic_bytes:.2f}, {p.traffic_bytes / nv.traffic_bytes:.4f}",
            "met": None,
        })
    return out


def plot(rows: list[Row], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = shape_of(llama_config())
    rows = [r for r in rows if r.impl in CORE]  # the core attention; whole-layer rows are in the table
    seqs = sorted({r.seq for r in rows})
    names = list(dict.fromkeys(r.impl for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    panels = (("median_s", "time per call (s)"), ("peak_bytes", "peak memory of the call (bytes)"),
              ("traffic_bytes", "traffic at aten op boundaries (bytes)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in names:
            mine = sorted((r for r in rows if r.impl == name and getattr(r, key) is not None), key=lambda r: r.seq)
            ran = [r for r in mine if r.ran]
            c = colors[name]
            if ran:
                ax.plot([r.seq for r in ran], [getattr(r, key) for r in ran], "o-", color=c, label=name)
            comp = [r for r in mine if not r.ran]
            if comp and key != "median_s":
                xs = [r.seq for r in comp]
                ys = [getattr(r, key) for r in comp]
                ax.plot(xs, ys, "o", color=c, mfc="white", label=None if ran else name)
                if ran:  # connect the last measured point to the computed ones
                    xs, ys = [ran[-1].seq] + xs, [getattr(ran[-1], key)] + ys
                ax.plot(xs, ys, ":", color=c)
        if key == "median_s":
            rate = info["roofline"]["matmul_gflops"] * 1e9
            ax.plot(seqs, [core_flops(s, n) / rate for n in seqs], "k--", lw=1,
                    label=f"roofline: core FLOPs at {rate / 1e9:.0f} GFLOP/s")
        if key == "peak_bytes" and info["machine"].get("ram_bytes"):
            ax.axhline(info["machine"]["ram_bytes"], color="k", ls="--", lw=1, label="this machine's RAM")
        if key == "traffic_bytes":
            ax.plot(seqs, [io_model(s, n)[0] for n in seqs], "--", color="gray", lw=1,
                    label="IO model, standard (4Nd+4N^2)")
            ax.plot(seqs, [io_model(s, n)[1] for n in seqs], "-.", color="gray", lw=1,
                    label="IO model, FlashAttention (M = 227 KB)")
            ax.plot(seqs, [4 * s.B * n * s.d * (2 * s.H + 2 * s.Hkv) for n in seqs], ":", color="k", lw=1,
                    label="compulsory: read q, k, v, write o")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqs, [str(n) for n in seqs])
        ax.set_xlabel("sequence length")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    m = info["machine"]
    fig.suptitle(
        f"Llama-3.2-1B attention (B={s.B}, H={s.H}, Hkv={s.Hkv}, d={s.d}, causal, float32) on CPU: {m['cpu']}, "
        f"{m['threads']} threads, torch {m['torch']}. Filled: measured; hollow/dotted: computed (cannot run here)",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# command line


def _csv(kind: str, text: str, allowed=None) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{kind} is empty: give a comma-separated list")
    if kind == "seq":
        try:
            vals = tuple(int(t) for t in items)
        except ValueError:
            raise UserError(f"--seq {text!r}: give sequence lengths as integers, e.g. --seq 1024,4096") from None
        if min(vals) < 1:
            raise UserError(f"--seq {text!r}: sequence lengths must be >= 1")
        return vals
    bad = [t for t in items if t not in allowed]
    if bad:
        raise UserError(f"--impl {','.join(bad)}: unknown; choose from {','.join(allowed)}")
    return tuple(items)


def main(argv=None) -> int:
    p = Parser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"seq {QUICK_SEQS[0]} only (under 2 minutes)")
    p.add_argument("--seq", help="comma-separated sequence lengths (default 1024,4096,16384,32768)")
    p.add_argument("--impl", help=f"comma-separated subset of {','.join(CORE + LAYER)}")
    p.add_argument("--runs", type=int, default=5, help="timed calls per configuration, after warm-up (default 5)")
    p.add_argument("--max-config-s", type=float, default=600.0,
                   help="skip a configuration projected to need more seconds for all its calls (default 600)")
    p.add_argument("--json", type=Path, help="write the rows here (default for a full run: docs/bench.json)")
    p.add_argument("--plot", type=Path, help="write the figure here (default for a full run: docs/bench.png)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: redraw the figure (--plot, default docs/bench.png) from --json rows")
    a = p.parse_args(argv)
    if a.replot:
        return replot(a.replot, a.plot or DOCS_PNG)
    if a.runs < 1:
        raise UserError(f"--runs {a.runs}: give at least 1 (5 or more for a median worth reporting)")
    opt = Options(runs=a.runs, max_config_s=a.max_config_s)
    if a.quick:
        opt.seqs = QUICK_SEQS
    if a.seq:
        opt.seqs = _csv("seq", a.seq)
    if a.impl:
        opt.impls = _csv("impl", a.impl, CORE + LAYER)
        opt.layer_any_seq = True
    full = not (a.quick or a.seq or a.impl)  # the documented run: it refreshes docs/
    json_path = a.json or (DOCS_JSON if full else None)
    png_path = a.plot or (DOCS_PNG if full else None)
    for path in (json_path, png_path):
        if path is not None and path.exists() and path.is_dir():
            raise UserError(f"{path} is a directory: give a file path")

    t0 = time.perf_counter()
    rows, info = run(opt)
    print("targets:")
    for t in targets(rows):
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"  {t['target']:66s} {t['value']:>14s}  {verdict}")
    if json_path:
        for r in rows:
            r.extra.update(matmul_gflops=info["roofline"]["matmul_gflops"], cpu=info["machine"]["cpu"],
                           threads=info["machine"]["threads"], torch=info["machine"]["torch"],
                           ram_bytes=info["machine"]["ram_bytes"])
        write_json(json_path, [r.json() for r in rows])
        print(f"wrote {json_path}")
    if png_path:
        plot(rows, info, png_path)
        print(f"wrote {png_path}")
    print(f"bench: {len(rows)} rows ({sum(r.ran for r in rows)} measured) in {time.perf_counter() - t0:.0f} s")
    return 0


def replot(src: Path, png: Path) -> int:
    try:
        docs = json.loads(Path(src).read_text())
        fields = set(Row.__dataclass_fields__) - {"extra"}
        rows = [Row(**{k: v for k, v in d.items() if k in fields}) for d in docs]
        first = docs[0]
        info = {
            "machine": {"cpu": first["cpu"], "threads": first["threads"], "torch": first["torch"],
                        "ram_bytes": first.get("ram_bytes")},
            "roofline": {"matmul_gflops": first["matmul_gflops"]},
        }
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
        raise UserError(f"--replot {src}: not rows written by scripts/bench.py --json ({why})") from None
    plot(rows, info, png)
    print(f"wrote {png} from {src}")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)
