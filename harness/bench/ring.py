"""The ring bench (`bench --ring`, `make bench-ring`): ring attention's forward on W rank processes of this machine
against one process running the whole sequence, and on paper when a ring step's transfer hides under its compute.

For each sequence length S, measured (harness/bench/ring.py runs everything below; docs/bench-ring.md shows it):

    ring, ring_zigzag   impl.RING's ring attention on W = 2 and 4 rank processes (contiguous and zigzag layouts)
    allgather           the baseline that gathers the whole K and V on every rank (contiguous layout)
    tiled               impl/tiled.py's core in one process on the whole sequence (W = 1): what the ring splits

    time          the forward call, wall clock. All ranks leave a barrier together and each times its own call; a
                  step's time is the slowest rank's (the ring is done when its last rank is); the median of --runs
                  steps, after a warm-up call at WARM_SEQ in the same processes (gloo's connections, lazy set-up)
    peak memory   per rank process, the resident-set growth of the call: VmHWM reset through /proc/self/clear_refs
                  (after gc and malloc_trim) to the RSS before the call, VmHWM - that RSS after it, as
                  docs/bench.md measures a call; where clear_refs is refused, the growth of getrusage's ru_maxrss (a
                  high-water mark since the process began: a floor). Each row says which. Inputs are excluded, the
                  output is included. tracemalloc would see none of it (torch allocates outside Python's allocator)
    bytes sent    per rank, counted by the harness's own wrappers on torch.distributed (harness/verify/ring_serve.py,
                  imported in each rank before the kernel), against the ideal (W - 1) x (K shard + V shard bytes)

Each rank process has one intra-op thread (torch.set_num_threads(1)): this machine has 2 cores shared with other
work, and W = 4 ranks already put two processes on each core; a second OpenMP thread per rank would wait at every
op's barrier for a core another rank holds. The single-process `tiled` row gets one thread too, so a row's speed-up
over it is what splitting the sequence over W processes buys (with W = 4 on 2 cores, at most 2x).

On paper (`on_paper`): the shortest shard for which a ring step's K/V transfer fits under its attention compute, on
GPU-class links and throughputs at Llama-3.2-1B's attention shapes; docs/bench-ring.md derives it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.bench import meter
from harness.bench.cases import llama_config, shape_of
from harness.bench.meter import CPU, human, status, trim
from harness.checkpoints.validate import output_path
from harness.common import Parser, UserError, generated_block, update_generated, whole_numbers, write_json

SEQS = (8192, 16384)
WORLDS = (2, 4)
IMPLS = ("ring", "ring_zigzag", "allgather", "tiled")
LAYOUT = {"ring": "contiguous", "ring_zigzag": "zigzag", "allgather": "contiguous"}
RING_IMPLS = ("ring", "ring_zigzag")  # those whose bytes must be the ideal
RUNS = 3
HEAD_SHARE = 2  # the bench runs 1 / HEAD_SHARE of Llama-3.2-1B's heads (bench_setup)
THREADS = 1  # intra-op threads per rank process (module docstring)
WARM_SEQ = 256  # the warm-up call's length (divisible by 2W for every W up to MAX_WORLD)
MAX_WORLD = 8
MAX_SEQ = 1 << 20
COMM_TIMEOUT_S = 900  # gloo's: a hung rank becomes an error
HWM = "VmHWM reset by /proc/self/clear_refs: VmHWM - VmRSS before the call"
MAXRSS = "ru_maxrss growth (getrusage; not resettable: a floor)"
TENSORS = "bytes of tensors alive at once in one call (harness/bench/meter.py)"
COUNTED = "counted: harness/verify/ring_serve.py's wrappers on torch.distributed"


@dataclass(frozen=True)
class Setup:
    """The attention's shapes: B sequences, H query heads over Hkv KV heads of head_dim d, float32, causal."""

    B: int = 1
    H: int = 32
    Hkv: int = 8
    d: int = 64
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def kv_shard_bytes(self, S: int, W: int) -> int:
        """One rank's K shard + V shard: 2 B Hkv (S / W) d element bytes."""
        return 2 * self.B * self.Hkv * (S // W) * self.d * self.torch_dtype.itemsize

    def input_bytes(self, S: int, W: int) -> int:
        """One rank's q, k and v shards."""
        return self.B * self.H * (S // W) * self.d * self.torch_dtype.itemsize + self.kv_shard_bytes(S, W)


def bench_setup() -> Setup:
    """The measured shapes: Llama-3.2-1B's head_dim and GQA group (its committed config: H / Hkv query heads per
    KV head), with HEAD_SHARE of its heads, batch 1, float32. A ring step's bytes over its FLOPs depend on Hkv / H
    and not on the head count, so the ratio is Llama's; the fraction keeps `make bench-ring` under 10 minutes here."""
    s = shape_of(llama_config())
    return Setup(H=s.H // HEAD_SHARE, Hkv=s.Hkv // HEAD_SHARE, d=s.d)


@dataclass
class Row:
    impl: str
    world: int  # rank processes (1: tiled, the whole sequence in one)
    seq: int  # S, the whole sequence
    tokens_per_rank: int
    layout: str = ""
    median_s: float | None = None  # a step: the slowest rank's call
    min_s: float | None = None
    max_s: float | None = None
    runs: int = 0
    step_s: list = field(default_factory=list)  # each run's step time
    cpu_s: float | None = None  # the median over runs of the busiest rank's CPU seconds in the call
    load: list = field(default_factory=list)  # the machine's 1-minute load average before and after the job
    peak_bytes: int | None = None  # the largest rank's
    rank_peak_bytes: list = field(default_factory=list)  # per rank, the largest over its runs
    peak_method: str = ""
    tensor_peak_bytes: int | None = None  # the largest rank's bytes of tensors alive at once in the call (meter.py)
    rank_tensor_peak_bytes: list = field(default_factory=list)
    input_bytes: int = 0  # one rank's q, k and v shards (excluded from both peaks)
    sent_bytes: list = field(default_factory=list)  # per rank, one call
    received_bytes: list = field(default_factory=list)
    ideal_bytes: int | None = None  # (W - 1) x (K + V shard bytes)
    sent_ratio: float | None = None  # the largest rank's sent / ideal
    bytes_method: str = ""


# ---------------------------------------------------------------------------------------------------------
# one rank process


def inputs(st: Setup, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's shard of n tokens: q (B, H, n, d), k and v (B, Hkv, n, d), random (time and bytes do not depend on
    the values; verify --ring checks what the kernels compute)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(st.B, st.H, n, st.d, generator=g, dtype=st.torch_dtype)  # (B, H, n, d)
    k = torch.randn(st.B, st.Hkv, n, st.d, generator=g, dtype=st.torch_dtype)  # (B, Hkv, n, d)
    v = torch.randn(st.B, st.Hkv, n, st.d, generator=g, dtype=st.torch_dtype)  # (B, Hkv, n, d)
    return q, k, v


def kernel(impl: str, W: int):
    """The call on one rank's (q, k, v): a ring built-in on the world group, or the tiled core (W = 1)."""
    from impl import CORES, RING  # lazy: a rank imports the kernels after ring_serve's wrappers (rank_main)

    if impl == "tiled":
        return functools.partial(CORES["tiled"], causal=True)
    return functools.partial(RING[impl], group=dist.group.WORLD, causal=True, layout=LAYOUT[impl])


def one_call(fn, q, k, v, W: int, hwm: bool, count) -> dict:
    """One measured call: the RSS growth, this rank's seconds from the shared barrier and CPU seconds (the whole
    process's: gloo's threads included), its bytes."""
    trim()
    base = status("VmRSS") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if hwm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
    count.reset()
    if W > 1:
        dist.barrier()  # every rank starts together
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = fn(q, k, v)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = status("VmHWM") - base if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del out
    return {"s": seconds, "cpu": cpu, "peak": max(peak, 0), "sent": count.sent, "received": count.received}


def metered(fn, q, k, v, W: int) -> int:
    """One call under the meter (harness/bench/meter.py): the most bytes of tensors alive at once, outputs included,
    inputs not; exact, whatever the allocator and gloo keep. Also this length's warm-up."""
    if W > 1:
        dist.barrier()
    with torch.no_grad():
        m, out = meter.meter_call(lambda: fn(q, k, v))
    del out
    return m.tensor_peak


def rank_main(rank: int, W: int, store: str, job: dict, out_dir: str) -> None:
    """One rank process (torch.multiprocessing.spawn): a warm-up call, then --runs measured calls at each length;
    what it measured goes to out_dir/rank{rank}.json."""
    torch.set_num_threads(THREADS)
    from harness.verify import ring_serve  # lazy: its wrappers go on torch.distributed in the rank processes only

    if W > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, W), rank=rank, world_size=W,
                                timeout=datetime.timedelta(seconds=COMM_TIMEOUT_S))  # fmt: skip
    st, hwm = Setup(**job["setup"]), meter.can_reset_hwm()
    fn = kernel(job["impl"], W)
    one_call(fn, *inputs(st, WARM_SEQ // W, seed=rank), W, hwm, ring_serve.COUNT)
    got = {"peak_method": HWM if hwm else MAXRSS, "seqs": {}, "tensor_peak": {}}
    for S in job["seqs"]:
        q, k, v = inputs(st, S // W, seed=S * MAX_WORLD + rank)
        got["tensor_peak"][str(S)] = metered(fn, q, k, v, W)
        got["seqs"][str(S)] = [one_call(fn, q, k, v, W, hwm, ring_serve.COUNT) for _ in range(job["runs"])]
        del q, k, v
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(got))
    if W > 1:
        dist.barrier()  # every rank has written its file
        # no destroy_process_group: gloo's threads, torn down at exit while a peer tears down too, can abort the
        # process ("terminate called without an active exception"); the result is on disk, so leave at once
        os._exit(0)


def run_job(st: Setup, impl: str, W: int, seqs: tuple[int, ...], runs: int) -> list[Row]:
    """W fresh rank processes for one implementation, every length: one Row per length."""
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-ring-") as tmp:
        job = {"setup": asdict(st), "impl": impl, "seqs": list(seqs), "runs": runs}
        mp.spawn(rank_main, args=(W, str(Path(tmp, "store")), job, tmp), nprocs=W, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(W)]
    load.append(os.getloadavg()[0])
    rows = []
    for S in seqs:
        calls = [g["seqs"][str(S)] for g in ranks]  # [rank][run]
        steps = [max(c[i]["s"] for c in calls) for i in range(runs)]
        row = Row(impl, W, S, S // W, layout=LAYOUT.get(impl, ""), median_s=statistics.median(steps),
                  min_s=min(steps), max_s=max(steps), runs=runs, step_s=steps, load=load,
                  cpu_s=statistics.median([max(c[i]["cpu"] for c in calls) for i in range(runs)]),
                  rank_peak_bytes=[max(x["peak"] for x in c) for c in calls], peak_method=ranks[0]["peak_method"],
                  sent_bytes=[c[0]["sent"] for c in calls],
                  received_bytes=[c[0]["received"] for c in calls], input_bytes=st.input_bytes(S, W),
                  rank_tensor_peak_bytes=[g["tensor_peak"][str(S)] for g in ranks])  # fmt: skip
        row.peak_bytes, row.tensor_peak_bytes = max(row.rank_peak_bytes), max(row.rank_tensor_peak_bytes)
        if W > 1:
            row.ideal_bytes = (W - 1) * st.kv_shard_bytes(S, W)
            row.sent_ratio = max(row.sent_bytes) / row.ideal_bytes
            row.bytes_method = COUNTED
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# the run


def jobs(impls: tuple[str, ...], worlds: tuple[int, ...]) -> list[tuple[str, int]]:
    """(implementation, W) in the order they run: tiled first (the rows' base), then each W's ring kernels."""
    out = [("tiled", 1)] if "tiled" in impls else []
    return out + [(i, W) for W in worlds for i in impls if i != "tiled"]


def run(st: Setup, seqs: tuple[int, ...], worlds: tuple[int, ...], impls: tuple[str, ...], runs: int,
        log=None) -> dict:  # fmt: skip
    """Every (implementation, W, S) row, the machine and the on-paper table: the JSON docs/bench-ring.json holds."""
    log = log or functools.partial(print, flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the machine's record says the ranks' thread count
    try:
        m = meter.machine(CPU)
    finally:
        torch.set_num_threads(before)
    log(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} intra-op thread per rank, torch {m['torch']}")
    log(f"shapes: B={st.B} H={st.H} Hkv={st.Hkv} d={st.d}, causal, {st.dtype}; {runs} runs per row")
    log(f"{'impl':12s} {'W':>2s} {'S':>6s} {'step (median)':>14s} {'CPU s':>7s} {'tensors':>9s} {'RSS':>9s} "
        f"{'sent / rank':>12s} {'/ ideal':>8s}")  # fmt: skip
    rows: list[Row] = []
    for impl, W in jobs(impls, worlds):
        t0 = time.perf_counter()
        mine = run_job(st, impl, W, seqs, runs)
        for r in mine:
            ratio = "-" if r.sent_ratio is None else f"{r.sent_ratio:.4f}x"
            log(f"{r.impl:12s} {r.world:2d} {r.seq:6d} {r.median_s:13.3f}s {r.cpu_s:7.2f} "
                f"{human(r.tensor_peak_bytes):>9s} {human(r.peak_bytes):>9s} "
                f"{human(max(r.sent_bytes)):>12s} {ratio:>8s}")  # fmt: skip
        log(f"  ({impl}, W={W}: {time.perf_counter() - t0:.0f} s with the processes' start)")
        rows += mine
    doc = {"machine": m, "setup": asdict(st), "rows": [asdict(r) for r in rows], "on_paper": on_paper()}
    doc["findings"] = findings(doc)
    return doc


# ---------------------------------------------------------------------------------------------------------
# on paper: when a ring step's transfer hides under its compute

# Links, per direction per GPU (a ring rank sends to one neighbour while receiving from the other), vendor specs
LINKS = (("NVLink 4 (H100 SXM)", 450.0, "NVIDIA: 900 GB/s total, both directions"),
         ("NVLink 3 (A100 SXM)", 300.0, "NVIDIA: 600 GB/s total, both directions"),
         ("PCIe 5.0 x16", 63.0, "PCI-SIG: 32 GT/s x 16 lanes, 128b/130b"),
         ("PCIe 4.0 x16", 31.5, "PCI-SIG: 16 GT/s x 16 lanes, 128b/130b"))  # fmt: skip
# Achieved bf16 attention-forward throughput, assumed (FlashAttention-2/-3-class kernels, not peak tensor rates)
GPUS = (("H100", 400.0), ("H100", 700.0), ("A100", 200.0))
PAIRS = (("NVLink 4 (H100 SXM)", "H100"), ("PCIe 5.0 x16", "H100"), ("NVLink 3 (A100 SXM)", "A100"),
         ("PCIe 4.0 x16", "A100"))  # fmt: skip
PAPER = Setup(B=1, H=32, Hkv=8, d=64, dtype="bfloat16")  # Llama-3.2-1B's attention, bf16


def min_tokens(gbps: float, tflops: float, st: Setup = PAPER, work: float = 4.0) -> float:
    """The shortest shard n = S / W for which one ring step's transfer takes no longer than its compute:

        transfer = 2 B Hkv n d s / bandwidth       (K and V blocks, s bytes an element)
        compute  = work B H n^2 d / throughput     (work = 4: a whole block, QK^T and PV at 2 n^2 d each per head;
                                                    2: half of one, the causal diagonal and every zigzag step)
        transfer <= compute   <=>   n >= 2 Hkv s throughput / (work H bandwidth)     (B and d cancel)
    """
    s = st.torch_dtype.itemsize
    return 2 * st.Hkv * s * (tflops * 1e12) / (work * st.H * gbps * 1e9)


def on_paper() -> list[dict]:
    """The table: each (link, GPU) pair at each assumed throughput, the minimum tokens per rank for a whole block
    per step (non-causal) and for half of one (causal: the diagonal, and every zigzag step)."""
    links = {name: (gbps, src) for name, gbps, src in LINKS}
    out = []
    for link, gpu in PAIRS:
        gbps, src = links[link]
        for name, tflops in GPUS:
            if name == gpu:
                out.append({"link": link, "gbps": gbps, "source": src, "gpu": gpu, "tflops": tflops,
                            "min_tokens_full": min_tokens(gbps, tflops, work=4.0),
                            "min_tokens_zigzag": min_tokens(gbps, tflops, work=2.0)})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# findings and the page


def _row(doc: dict, impl: str, W: int, S: int) -> dict | None:
    return next((r for r in doc["rows"] if (r["impl"], r["world"], r["seq"]) == (impl, W, S)), None)


def held(r: dict) -> int:
    """What a rank holds at its peak: its inputs and the tensor peak of the call."""
    return r["input_bytes"] + r["tensor_peak_bytes"]


def findings(doc: dict) -> list[dict]:
    """What the rows say: the ring kernels' bytes against the ideal (a goal), and beside tiled's one process and
    each other the time and memory (no goal)."""
    out = []
    for r in doc["rows"]:
        if r["impl"] in RING_IMPLS:
            exact = all(b == r["ideal_bytes"] for b in r["sent_bytes"])
            out.append({"finding": f"{r['impl']} W={r['world']} S={r['seq']}: every rank sends (W - 1) x (K + V "
                                   "shard)",
                        "value": f"{r['sent_ratio']:.4f}x ({human(max(r['sent_bytes']))} / "
                                 f"{human(r['ideal_bytes'])})", "met": exact})  # fmt: skip
    for r in doc["rows"]:
        t = _row(doc, "tiled", 1, r["seq"])
        if r["world"] > 1 and t:
            out.append({"finding": f"{r['impl']} W={r['world']} S={r['seq']} against tiled in one process",
                        "value": f"speed-up {t['median_s'] / r['median_s']:.2f}x (tiled's time / this); the "
                                 f"busiest rank's CPU seconds {r['cpu_s'] / t['cpu_s']:.2f}x tiled's; held per rank "
                                 f"(inputs + tensor peak) {held(r) / held(t):.2f}x tiled's", "met": None})  # fmt: skip
    return out


def markdown(doc: dict) -> str:
    """The generated block of docs/bench-ring.md, from the JSON document alone (the page can be rebuilt from it)."""
    m, st = doc["machine"], doc["setup"]
    runs = doc["rows"][0]["runs"] if doc["rows"] else 0
    out = [f"Run on {m['cpu']} ({m['cores']} cores; {m['threads']} intra-op thread per process), torch {m['torch']}."
           f" Shapes: B={st['B']}, H={st['H']} query heads, Hkv={st['Hkv']} KV heads, head_dim {st['d']}, causal, "
           f"{st['dtype']}; S the whole sequence, W rank processes (gloo); time: the slowest rank's call, median "
           f"(min..max) of {runs}; peak: the largest rank's.", "",
           "| impl | W | S | tokens per rank | time per forward | CPU s, busiest rank | inputs per rank | peak per "
           "rank: tensors | peak per rank: RSS | sent per rank | ideal | sent / ideal | load before, after |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        when = f"{r['median_s']:.3g} s ({r['min_s']:.3g}..{r['max_s']:.3g})"
        sent = "-" if r["world"] == 1 else human(max(r["sent_bytes"]))
        ideal = "-" if r["ideal_bytes"] is None else human(r["ideal_bytes"])
        ratio = "-" if r["sent_ratio"] is None else f"{r['sent_ratio']:.4f}x"
        name = f"`{r['impl']}`" + (f" ({r['layout']})" if r["layout"] else " (one process)")
        load = ", ".join(f"{x:.1f}" for x in r["load"])
        out.append(f"| {name} | {r['world']} | {r['seq']} | {r['tokens_per_rank']} | {when} | {r['cpu_s']:.3g} | "
                   f"{human(r['input_bytes'])} | {human(r['tensor_peak_bytes'])} | {human(r['peak_bytes'])} | "
                   f"{sent} | {ideal} | {ratio} | {load} |")  # fmt: skip
    methods = sorted({r["peak_method"] for r in doc["rows"]})
    out += ["", f"Peak per rank, tensors: {TENSORS}; RSS: {'; '.join(methods)}. Both exclude the inputs. Bytes: "
            f"{COUNTED.split(': ', 1)[1]}.", "", "Findings:", ""]
    for f in doc["findings"]:
        verdict = "n/a" if f["met"] is None else ("**MET**" if f["met"] else "**MISSED**")
        out.append(f"- {f['finding']}: {f['value']} ({verdict})")
    p = PAPER
    out += ["", f"On paper (`harness/bench/ring.py: min_tokens`), Llama-3.2-1B's attention: H={p.H}, Hkv={p.Hkv}, "
            f"head_dim {p.d}, {p.dtype}:", "",
            "| link | per direction | GPU | attention throughput (assumed) | min tokens per rank, non-causal (a "
            "whole block a step) | min tokens per rank, causal (half a block: the diagonal, every zigzag step) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["on_paper"]:
        out.append(f"| {r['link']} | {r['gbps']:g} GB/s ({r['source']}) | {r['gpu']} | {r['tflops']:g} TFLOP/s | "
                   f"{r['min_tokens_full']:.0f} | {r['min_tokens_zigzag']:.0f} |")  # fmt: skip
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# command line


def parser() -> Parser:
    p = Parser(prog="attention-verify bench --ring",
               description="Ring attention's forward on W rank processes of this machine against one process: time, "
                           "peak memory per rank, bytes sent per rank against the ideal; and on paper, when a ring "
                           "step's transfer hides under its compute on GPU links.")  # fmt: skip
    p.many("--seq", split=True, help=f"whole-sequence lengths (default {' '.join(map(str, SEQS))}); commas too")
    p.many("--world", split=True, help=f"rank processes (default {' '.join(map(str, WORLDS))}); commas too")
    p.many("--impl", split=True, help=f"a subset of {','.join(IMPLS)}; commas too")
    p.number("--heads", lo=1, hi=1024, kind=int, help="query heads (default: half of Llama-3.2-1B's)")
    p.number("--kv-heads", lo=1, hi=1024, kind=int, help="KV heads (default: half of Llama-3.2-1B's)")
    p.number("--runs", lo=1, hi=1000, kind=int, default=RUNS, help=f"measured calls per row (default {RUNS})")
    p.add_argument("--json", type=Path, help="write the rows here (make bench-ring: docs/bench-ring.json)")
    p.add_argument("--doc", type=Path, help="fill this page's generated block (make bench-ring: docs/bench-ring.md)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    impls = IMPLS if not a.impl else tuple(dict.fromkeys(a.impl))
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise UserError(f"--impl {','.join(bad)}: unknown; choose from {','.join(IMPLS)}")
    seqs = whole_numbers(a.seq, "--seq", 1, MAX_SEQ, "8192 16384") if a.seq else SEQS
    worlds = whole_numbers(a.world, "--world", 2, MAX_WORLD, "2 4") if a.world else WORLDS
    for S in seqs:
        for W in worlds:
            if S % (2 * W):
                raise UserError(f"--seq {S}: every length must split into 2W equal chunks (the zigzag layout); "
                                f"{S} is not divisible by {2 * W}")  # fmt: skip
    base = bench_setup()
    st = Setup(B=base.B, H=a.heads or base.H, Hkv=a.kv_heads or base.Hkv, d=base.d)
    if st.H % st.Hkv:
        raise UserError(f"--heads {st.H} --kv-heads {st.Hkv}: the query heads must be a multiple of the KV heads")
    for path, option in ((a.json, "--json"), (a.doc, "--doc")):
        if path is not None:
            output_path(path, option)
    if a.doc:
        generated_block(a.doc, "--doc")  # refused before the run, not after
    t0 = time.perf_counter()
    doc = run(st, seqs, worlds, impls, a.runs)
    print("findings:")
    for f in doc["findings"]:
        print(f"  {'n/a' if f['met'] is None else 'MET' if f['met'] else 'MISSED':6s}  {f['finding']}: {f['value']}")
    for r in doc["on_paper"]:
        print(f"  on paper: {r['link']} ({r['gbps']:g} GB/s), {r['gpu']} at {r['tflops']:g} TFLOP/s: >= "
              f"{r['min_tokens_full']:.0f} tokens per rank (non-causal), {r['min_tokens_zigzag']:.0f} (causal)")
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}")
    if a.doc:
        update_generated(a.doc, markdown(doc))
        print(f"wrote {a.doc} (its generated block)")
    print(f"bench --ring: {len(doc['rows'])} rows in {time.perf_counter() - t0:.0f} s")
    return 0
