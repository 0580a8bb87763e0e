"""The paged decode bench (`bench --paged`, `make bench-paged`): one decode step over a paged KV cache against its
physical limit.

A decode step does O(L d) arithmetic per head against L cached keys: it is memory-bound, and the least it can move
is each sequence's keys and values, read once. That is the limit: the batch's KV-cache bytes, B L Hkv 2 d size
(impl/paged_triton.kv_cache_bytes). For each context length L (tokens per sequence) this measures

    paged_triton  its global loads and stores: counted in Triton's interpreter (kernel_traffic.count) where one
                  interpreted call is projected to fit --max-interpreted-s, else impl/paged_triton.traffic's closed
                  form (exact: tests/test_paged_impl.py compares the two); each row says which
    paged_naive   the bytes at aten op boundaries (meter.Meter), as the core bench counts naive attention: it
    paged_split   gathers each sequence's pages into new dense tensors, then reads those

and each one's traffic / KV-cache bytes (the goal for paged_triton: <= 1.1x); and the time of one decode step for
the PyTorch built-ins (paged_naive, paged_split): wall clock, the median of --runs calls taken in turns (one call of
each, then again) in one process, so their ratio is measured under the same load; beside it the limit's time on this
machine, the KV-cache bytes at the copy bandwidth measured in the same run. paged_triton's interpreted time is no
kernel time: it is recorded in the JSON, never shown as a step time.

One intra-op thread by default (--threads): a decode step is hundreds of small ops, and on a shared machine (this
one: 2 cores) every op of a second thread waits at OpenMP's barrier for a core other work holds: measured here, a
1024-token step took 0.24 s with 2 threads under load and 6 ms with one.

Shapes: Llama-3.2-1B's attention heads (H 32 query, Hkv 8 KV, head_dim 64; its committed config), B sequences of L
tokens each, decode (Sq = 1, causal), pages of 16 tokens, a shuffled block table over a pool of exactly the pages
the batch uses, float32 (--batch, --page-size, --dtype change them). CPU only: the interpreter is the counter.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.bench import meter
from harness.bench.cases import llama_config, shape_of
from harness.bench.kernel_traffic import count
from harness.bench.meter import CPU, human, meter_call, wall_clock
from harness.checkpoints.validate import output_path
from harness.common import Parser, UserError, generated_block, update_generated, whole_numbers, write_json
from impl import PAGED
from impl import paged_triton as pt

TOKENS = (1024, 8192, 32768)  # tokens per sequence
IMPLS = ("paged_triton", "paged_naive", "paged_split")
TIMED = ("paged_naive", "paged_split")  # the PyTorch built-ins; paged_triton runs interpreted on a CPU
INTERPRETED = ("paged_triton",)
GOAL = 1.1  # paged_triton's traffic / KV-cache bytes (the target)
MAX_INTERPRETED_S = 120.0  # one interpreted call projected longer: its traffic is the closed form (as bench.md)
WARM_TOKENS = 64  # the interpreter's first call (Triton's import, the kernel's rewriting): one tile per program
MAX_TOKENS = 1 << 20
THREADS = 1  # intra-op threads while measuring (module docstring)
MEM_FRACTION = 0.5  # the pool may take this much of the free memory (the gathers need as much again)
COUNTED = "counted: Triton interpreter, global loads/stores"
CLOSED_FORM = "closed form: impl/paged_triton.traffic (== the count where both ran)"
ATEN = "measured: aten op boundaries, cpu run"
TIME_WALL = "measured: wall clock, median of the calls taken in turns"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Setup:
    """The batch's shapes: B sequences of the bench's lengths, query heads H over Hkv KV heads of head_dim d."""

    B: int = 4
    H: int = 32
    Hkv: int = 8
    d: int = 64
    page: int = 16
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def kv_bytes(self, L: int) -> int:
        return pt.kv_cache_bytes([L] * self.B, Hkv=self.Hkv, d=self.d, dtype=self.torch_dtype)


def llama_setup(B: int = 4, page: int = 16, dtype: str = "float32") -> Setup:
    """Llama-3.2-1B's attention heads (its committed config), B sequences, pages of `page` tokens."""
    s = shape_of(llama_config())
    return Setup(B=B, H=s.H, Hkv=s.Hkv, d=s.d, page=page, dtype=dtype)


@dataclass
class Row:
    impl: str
    tokens: int  # per sequence
    kv_cache_bytes: int  # the limit: every sequence's K and V read once
    traffic_bytes: int | None = None
    traffic_method: str = ""
    ratio: float | None = None  # traffic / KV-cache bytes
    load_bytes: int | None = None  # paged_triton: the two sides of its traffic
    store_bytes: int | None = None
    closed_form_bytes: int | None = None  # paged_triton: traffic()'s, beside a count
    interpreted_s: float | None = None  # paged_triton: the interpreter's seconds for the counted call (no kernel time)
    aten_ops: int | None = None
    median_s: float | None = None  # one decode step (the PyTorch built-ins)
    min_s: float | None = None
    max_s: float | None = None
    runs: int = 0
    time_method: str = ""
    note: str = ""


# ---------------------------------------------------------------------------------------------------------
# the batch and the measurements


def batch(st: Setup, L: int, seed: int = 0) -> dict:
    """A decode step's inputs: B sequences of L tokens in a pool of exactly their pages, the block table a random
    permutation of the pool (no sequence's pages contiguous or in order), random keys, values and queries."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-L // st.page)
    k_cache = torch.randn(st.B * pages, st.page, st.Hkv, st.d, generator=g, dtype=st.torch_dtype)
    v_cache = torch.randn(st.B * pages, st.page, st.Hkv, st.d, generator=g, dtype=st.torch_dtype)
    table = torch.randperm(st.B * pages, generator=g).to(torch.int32).view(st.B, pages)  # (B, pages)
    q = torch.randn(st.B, st.H, 1, st.d, generator=g, dtype=st.torch_dtype)  # (B, H, Sq=1, d)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table,
            "cache_seqlens": torch.full((st.B,), L, dtype=torch.int32)}  # fmt: skip


def step(name: str, x: dict):
    """One decode step of the named built-in on the inputs: (out, lse)."""
    return PAGED[name](x["q"], x["k_cache"], x["v_cache"], block_table=x["block_table"],
                       cache_seqlens=x["cache_seqlens"])  # fmt: skip


def closed_form(st: Setup, L: int) -> dict:
    """paged_triton's loads and stores for B sequences of L tokens, decode, causal: impl/paged_triton.traffic."""
    return pt.traffic([L] * st.B, H=st.H, Hkv=st.Hkv, Sq=1, d=st.d, page_size=st.page, dtype=st.torch_dtype)


def interpreter_work(st: Setup, L: int) -> int:
    """What an interpreted call's time follows: the key tiles its programs walk (B Hkv programs, cdiv(L, BLOCK_N)
    tiles each)."""
    return st.B * st.Hkv * -(-L // pt.BLOCK_N)


def triton_row(st: Setup, L: int, x: dict | None, last: tuple[int, float], max_s: float) -> Row:
    """paged_triton at L: counted in the interpreter if one call is projected (from the last counted call's
    (tokens, seconds), by the tiles walked) to fit max_s, else the closed form. x: the inputs (None: not built)."""
    closed = closed_form(st, L)
    row = Row("paged_triton", L, st.kv_bytes(L), closed_form_bytes=closed["load_bytes"] + closed["store_bytes"])
    projected = last[1] * interpreter_work(st, L) / interpreter_work(st, last[0])
    if x is not None and projected <= max_s:
        with count() as t:
            t0 = time.perf_counter()
            step("paged_triton", x)
            row.interpreted_s = time.perf_counter() - t0
        if t.load_calls == 0:
            raise RuntimeError("paged_triton did not run in Triton's interpreter: nothing was counted")
        row.load_bytes, row.store_bytes, row.traffic_method = t.load_bytes, t.store_bytes, COUNTED
        row.note = "counted == closed form" if t.total_bytes == row.closed_form_bytes else "counted != closed form"
    else:
        row.load_bytes, row.store_bytes, row.traffic_method = closed["load_bytes"], closed["store_bytes"], CLOSED_FORM
        row.note = (f"interpreted (no GPU): projected {projected:.0f} s for one call > {max_s:g} s "
                    "(--max-interpreted-s)")  # fmt: skip
    row.traffic_bytes = row.load_bytes + row.store_bytes
    row.ratio = row.traffic_bytes / row.kv_cache_bytes
    return row


def warm_triton(st: Setup) -> tuple[int, float]:
    """The interpreter's first call, at WARM_TOKENS (Triton's import and the kernel's rewriting happen here):
    (tokens, seconds), the first base of the projection (an overestimate: the import is in it)."""
    x = batch(st, WARM_TOKENS, seed=1)
    t0 = time.perf_counter()
    step("paged_triton", x)
    return WARM_TOKENS, time.perf_counter() - t0


def aten_row(name: str, st: Setup, L: int, x: dict) -> Row:
    """A PyTorch built-in's bytes at aten op boundaries in one call (also its warm-up for the timing)."""
    m, _ = meter_call(lambda: step(name, x))
    row = Row(name, L, st.kv_bytes(L), traffic_bytes=m.traffic, traffic_method=ATEN, aten_ops=m.ops)
    row.ratio = m.traffic / row.kv_cache_bytes
    return row


def time_in_turns(names: list[str], x: dict, runs: int) -> dict[str, list[float]]:
    """runs rounds of one call of each built-in in turn: the same load on each, so their ratio is fair."""
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(runs):
            for n in names:
                times[n].append(wall_clock(lambda n=n: step(n, x)))
    return times


# ---------------------------------------------------------------------------------------------------------
# the run


def check_memory(st: Setup, tokens: tuple[int, ...]) -> None:
    """The largest pool must fit in MEM_FRACTION of the free memory (the gathers need about as much again)."""
    need = 2 * st.kv_bytes(max(tokens))
    free = meter.meminfo("MemAvailable")
    if free is not None and need > MEM_FRACTION * free:
        raise UserError(f"--tokens {max(tokens)}: the KV cache of {st.B} sequences needs {human(need)}, "
                        f"{human(free)} free; give fewer tokens or a smaller --batch")  # fmt: skip


def run(st: Setup, tokens: tuple[int, ...], impls: tuple[str, ...], runs: int, max_interpreted_s: float,
        threads: int = THREADS, log=None) -> dict:  # fmt: skip
    """Every (impl, tokens) row and the machine they ran on, with `threads` intra-op threads (restored after): the
    JSON document docs/bench-paged.json holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(st, tokens, impls, runs, max_interpreted_s, log or functools.partial(print, flush=True))
    finally:
        torch.set_num_threads(before)


def _run(st: Setup, tokens: tuple[int, ...], impls: tuple[str, ...], runs: int, max_interpreted_s: float,
         log) -> dict:  # fmt: skip
    info = {"machine": meter.machine(CPU), "roofline": meter.roofline(CPU)}
    m, copy = info["machine"], info["roofline"]["copy_gbps"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} intra-op threads, torch {m['torch']}; copy "
        f"{copy:.1f} GB/s")
    log(f"shapes: B={st.B} H={st.H} Hkv={st.Hkv} d={st.d}, decode (Sq=1, causal), page {st.page}, {st.dtype}")
    log(f"{'impl':13s} {'tokens':>6s} {'KV cache':>10s} {'traffic':>10s} {'/ KV':>8s} {'step time':>9s}  how")
    rows: list[Row] = []
    last = warm_triton(st) if any(i in INTERPRETED for i in impls) else (1, 0.0)
    for L in sorted(tokens):
        x = batch(st, L, seed=L)
        mine = []
        if "paged_triton" in impls:
            mine.append(triton_row(st, L, x, last, max_interpreted_s))
            if mine[-1].interpreted_s is not None:
                last = (L, mine[-1].interpreted_s)
        timed = [n for n in TIMED if n in impls]
        mine += [aten_row(n, st, L, x) for n in timed]
        for n, ts in time_in_turns(timed, x, runs).items():
            r = next(r for r in mine if r.impl == n)
            r.median_s, r.min_s, r.max_s, r.runs = statistics.median(ts), min(ts), max(ts), runs
            r.time_method = TIME_WALL
        del x
        for r in mine:
            step_time = "-" if r.median_s is None else f"{r.median_s:.3f}s"
            log(f"{r.impl:13s} {L:6d} {human(r.kv_cache_bytes):>10s} {human(r.traffic_bytes):>10s} "
                f"{r.ratio:7.3f}x {step_time:>9s}  {r.traffic_method.split(':')[0]}"
                f"{', ' + r.note if r.note else ''}")  # fmt: skip
        rows += mine
    doc = {**info, "setup": asdict(st), "rows": [asdict(r) for r in rows]}
    doc["targets"] = targets(doc)
    return doc


# ---------------------------------------------------------------------------------------------------------
# the targets and the page


def _rows(doc: dict, impl: str) -> list[dict]:
    return [r for r in doc["rows"] if r["impl"] == impl]


def limit_s(doc: dict, kv_bytes: int) -> float:
    """The limit's time here: the KV-cache bytes at the copy bandwidth measured in the same run."""
    return kv_bytes / (doc["roofline"]["copy_gbps"] * 1e9)


def targets(doc: dict) -> list[dict]:
    """paged_triton's traffic / KV cache against GOAL at each length; paged_naive's and paged_split's (no goal:
    they gather); paged_split's step time over paged_naive's, and each over the limit's time (no goal)."""
    out = []
    for r in _rows(doc, "paged_triton"):
        how = "counted" if r["traffic_method"] == COUNTED else "closed form"
        out.append({"target": f"paged_triton traffic / KV cache <= {GOAL}x at {r['tokens']} tokens",
                    "value": f"{r['ratio']:.4f}x ({human(r['traffic_bytes'])} {how} / {human(r['kv_cache_bytes'])})",
                    "met": r["ratio"] <= GOAL})  # fmt: skip
    for name in ("paged_naive", "paged_split"):
        mine = _rows(doc, name)
        if mine:
            out.append({"target": f"{name} traffic / KV cache (aten op boundaries: it gathers)",
                        "value": "; ".join(f"{r['tokens']}: {r['ratio']:.2f}x" for r in mine), "met": None})
    for a in _rows(doc, "paged_split"):
        b = next((r for r in _rows(doc, "paged_naive") if r["tokens"] == a["tokens"]), None)
        if b and a["median_s"] and b["median_s"]:
            out.append({"target": f"time per decode step at {a['tokens']} tokens: paged_split / paged_naive "
                                  "(one process, in turns)",
                        "value": f"{a['median_s'] / b['median_s']:.2f}x ({a['median_s']:.3g} s vs "
                                 f"{b['median_s']:.3g} s; the limit here {limit_s(doc, a['kv_cache_bytes']):.2g} s)",
                        "met": None})  # fmt: skip
    return out


def markdown(doc: dict) -> str:
    """The generated block of docs/bench-paged.md, from the JSON document alone (the page can be rebuilt from it)."""
    m, st = doc["machine"], doc["setup"]
    out = [f"Run on {m['cpu']} ({m['cores']} cores; {m['threads']} intra-op thread{'s' if m['threads'] > 1 else ''}, "
           f"{m['device']}), torch {m['torch']}; copy bandwidth "
           f"{doc['roofline']['copy_gbps']:.1f} GB/s (measured in the same run). Shapes: B={st['B']} sequences, "
           f"H={st['H']} query heads, Hkv={st['Hkv']} KV heads, head_dim {st['d']}, decode (Sq=1, causal), pages of "
           f"{st['page']} tokens, {st['dtype']}.", "",
           "| impl | tokens per sequence | KV cache (the limit) | traffic | traffic / KV cache | time per decode step: "
           "median (min..max) | the limit's time here | |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        how = {COUNTED: "counted", CLOSED_FORM: "closed form", ATEN: "aten op boundaries"}.get(r["traffic_method"], "")
        if r["median_s"] is not None:
            when = f"{r['median_s']:.3g} s ({r['min_s']:.3g}..{r['max_s']:.3g}), {r['runs']} calls"
        else:
            when = "- (interpreted: no kernel time)" if r["impl"] in INTERPRETED else "-"
        out.append(f"| `{r['impl']}` | {r['tokens']} | {human(r['kv_cache_bytes'])} | {human(r['traffic_bytes'])} "
                   f"({how}) | {r['ratio']:.4f}x | {when} | {limit_s(doc, r['kv_cache_bytes']):.2g} s | "
                   f"{r['note']} |")  # fmt: skip
    out += ["", "Targets:", ""] + ([] if doc["targets"] else ["- none covered by this run"])
    for t in doc["targets"]:
        verdict = "n/a" if t["met"] is None else ("**MET**" if t["met"] else "**MISSED**")
        out.append(f"- {t['target']}: {t['value']} ({verdict})")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# command line


def parser() -> Parser:
    p = Parser(prog="attention-verify bench --paged",
               description="One paged decode step against its physical limit (each sequence's K and V read once): "
                           "traffic / KV-cache bytes, time per step, on Llama-3.2-1B's attention heads.")  # fmt: skip
    p.many("--tokens", split=True, help=f"tokens per sequence (default {' '.join(map(str, TOKENS))}); commas too")
    p.many("--impl", split=True, help=f"a subset of {','.join(IMPLS)}; commas too")
    p.number("--batch", lo=1, hi=1024, kind=int, default=4, help="sequences in the batch (default 4)")
    p.number("--page-size", lo=1, hi=4096, kind=int, default=16, help="tokens per page, a power of two (default 16)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the cache's and the queries' (default float32)")
    p.number("--runs", lo=1, hi=1000, kind=int, default=5,
             help="timed calls of each PyTorch built-in, after the metered one (default 5)")  # fmt: skip
    p.number("--threads", lo=1, hi=1024, kind=int, default=THREADS,
             help=f"intra-op threads while measuring (default {THREADS}: on a shared machine a second thread waits "
                  "at every op's barrier)")  # fmt: skip
    p.number("--max-interpreted-s", lo=0, hi=7 * 24 * 3600, above=True, unit="seconds", default=MAX_INTERPRETED_S,
             help="paged_triton runs in Triton's interpreter, its traffic counted, where one call is projected to "
                  f"take at most this (default {MAX_INTERPRETED_S:g}); beyond, its closed form")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the rows here (make bench-paged: docs/bench-paged.json)")
    p.add_argument("--doc", type=Path, help="fill this page's generated block (make bench-paged: docs/bench-paged.md)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.page_size & (a.page_size - 1):
        raise UserError(f"--page-size {a.page_size}: give a power of two (paged_triton's tiles hold whole pages)")
    impls = IMPLS if not a.impl else tuple(dict.fromkeys(a.impl))
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise UserError(f"--impl {','.join(bad)}: unknown; choose from {','.join(IMPLS)}")
    tokens = whole_numbers(a.tokens, "--tokens", 1, MAX_TOKENS, "1024 8192") if a.tokens else TOKENS
    st = llama_setup(a.batch, a.page_size, a.dtype)
    check_memory(st, tokens)
    for path, option in ((a.json, "--json"), (a.doc, "--doc")):
        if path is not None:
            output_path(path, option)
    if a.doc:
        generated_block(a.doc, "--doc")  # refused before the run, not after
    t0 = time.perf_counter()
    doc = run(st, tokens, impls, a.runs, a.max_interpreted_s, a.threads)
    print("targets:")
    for t in doc["targets"]:
        print(f"  {'n/a' if t['met'] is None else 'MET' if t['met'] else 'MISSED':6s}  {t['target']}: {t['value']}")
    if a.json:
        write_json(a.json, doc)
        print(f"wrote {a.json}")
    if a.doc:
        update_generated(a.doc, markdown(doc))
        print(f"wrote {a.doc} (its generated block)")
    print(f"bench --paged: {len(doc['rows'])} rows in {time.perf_counter() - t0:.0f} s")
    return 0
