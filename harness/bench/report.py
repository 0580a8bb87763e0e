"""The report and the command line (`make bench`, scripts/bench.py): the table is printed as rows are measured
(run.py); here the issue's targets evaluated on the rows, the JSON, the figure (docs/bench.png) and the table of
docs/bench.md's generated block.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from harness.bench import cases, paged, ring
from harness.bench.cases import BACKWARD, BACKWARD_ROWS, CORE, INTERPRETED, LAYER, io_model, llama_config, shape_of
from harness.bench.meter import human
from harness.bench.run import MAX_INTERPRETED_S, QUICK_SEQS, TIME_INTERPRETED, Options, Row, run
from harness.bench.saved import read_rows
from harness.checkpoints.validate import output_path
from harness.common import (
    DOCS,
    WEEK_S,
    Parser,
    UserError,
    generated_block,
    resolve_device,
    run_cli,
    update_generated,
    write_atomic,
    write_json,
)

DOCS_JSON, DOCS_PNG, DOCS_MD = DOCS / "bench.json", DOCS / "bench.png", DOCS / "bench.md"
MAX_RUNS = 10_000  # timed calls per configuration: far past what a median needs
MAX_SEQ = 1 << 20  # a sequence length: past what any machine here holds (the plan refuses what does not fit)
SKIPS_OUTSIDE_WINDOW = ("tiled", "triton")  # their windowed cost should grow as the pairs do
TRAFFIC_PLOTTED = ("naive", "tiled", "triton", "sdpa")  # beside the IO model; every row's traffic is in the JSON


# ---------------------------------------------------------------------------------------------------------
# targets and report


def _get(rows: list[Row], impl: str, seq: int, direction: str = "forward", window: int | None = None) -> Row | None:
    return next((r for r in rows if (r.impl, r.seq, r.direction, r.window) == (impl, seq, direction, window)), None)


def targets(rows: list[Row]) -> list[dict]:
    """The issue's targets, evaluated on this run's rows (absent when the run did not cover them)."""
    out = []
    t, p = _get(rows, "tiled", 4096), _get(rows, "sdpa", 4096)
    if t and p and t.ran and p.ran:
        r = t.median_s / p.median_s
        out.append({"target": "tiled time <= 1.15x sdpa at 4096",
                    "value": f"{r:.2f}x ({t.median_s:.3g} s vs {p.median_s:.3g} s)", "met": r <= 1.15})  # fmt: skip
    t, p = _get(rows, "tiled", 16384), _get(rows, "sdpa", 16384)
    if t and p and t.ran and p.ran:
        r = t.peak_bytes / p.peak_bytes
        out.append({"target": "tiled peak memory <= 2x sdpa at 16384",
                    "value": f"{r:.2f}x ({human(t.peak_bytes)} vs {human(p.peak_bytes)})", "met": r <= 2})  # fmt: skip
    t = _get(rows, "tiled", 32768)
    if t:
        out.append({"target": "tiled runs 32768 tokens here", "value": "ran" if t.ran else "not run", "met": t.ran})
    t, nv, p = _get(rows, "tiled", 4096), _get(rows, "naive", 4096), _get(rows, "sdpa", 4096)
    if t and nv and p and t.traffic_bytes and nv.traffic_bytes and p.traffic_bytes:
        out.append({
            "target": "traffic at 4096 (aten op boundaries): tiled / naive, sdpa / naive",
            "value": f"{t.traffic_bytes / nv.traffic_bytes:.2f}, {p.traffic_bytes / nv.traffic_bytes:.4f}",
            "met": None,
        })
    t, p = _get(rows, "tiled", 4096, "backward"), _get(rows, "sdpa", 4096, "backward")
    if t and p and t.ran and p.ran:
        r = t.median_s / p.median_s
        out.append({"target": "tiled backward time <= 1.5x sdpa backward at 4096",
                    "value": f"{r:.2f}x ({t.median_s:.3g} s vs {p.median_s:.3g} s)", "met": r <= 1.5})  # fmt: skip
        r = t.peak_bytes / p.peak_bytes
        out.append({"target": "tiled backward peak memory <= 2x sdpa backward at 4096",
                    "value": f"{r:.2f}x ({human(t.peak_bytes)} vs {human(p.peak_bytes)})", "met": r <= 2})  # fmt: skip
    ratios = []
    for n in (1024, 4096, 16384):
        nv, tr = _get(rows, "naive", n), _get(rows, "triton", n)
        if nv and tr and nv.traffic_bytes and tr.traffic_bytes:
            how = "counted" if tr.traffic_method.startswith("counted") else "closed form"
            r = nv.traffic_bytes / tr.traffic_bytes
            ratios.append(f"{n}: {human(nv.traffic_bytes)}{'' if nv.ran else ' (computed)'} / "
                          f"{human(tr.traffic_bytes)} ({how}) = {r:.1f}x")  # fmt: skip
    if ratios:
        out.append({"target": "traffic naive (aten op boundaries) / triton (the kernel's global loads and stores)",
                    "value": "; ".join(ratios), "met": None})  # fmt: skip
    return out + window_targets(rows)


def window_targets(rows: list[Row]) -> list[dict]:
    """With a window of W keys the work per query is bounded: from the shortest windowed seq to the longest, each
    implementation's time and traffic should grow as the (query, key) pairs do (about linearly), where full
    causal grows as n^2. Met when the windowed growth is within 1.25x of the pairs' growth (timing noise here is
    10-20%), for the implementations that skip the key blocks outside the window (the others compute every pair
    and mask: shown, no target); the full causal growth is shown beside it."""
    out = []
    for impl, direction, w in dict.fromkeys((r.impl, r.direction, r.window) for r in rows if r.window is not None):
        mine = sorted((r for r in rows if (r.impl, r.direction, r.window) == (impl, direction, w)), key=lambda r: r.seq)
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        grow = cases.pairs(b.seq, w) / cases.pairs(a.seq, w)
        full = cases.pairs(b.seq) / cases.pairs(a.seq)
        for key, what in (("median_s", "time"), ("traffic_bytes", "traffic")):
            timed = key == "median_s"
            if timed and not (a.ran and b.ran and TIME_INTERPRETED not in (a.time_method, b.time_method)):
                continue
            va, vb = getattr(a, key), getattr(b, key)
            if not va or not vb:
                continue
            ca, cb = _get(rows, impl, a.seq, direction), _get(rows, impl, b.seq, direction)
            causal = getattr(ca, key) if ca else None, getattr(cb, key) if cb else None
            seen = (f"; full causal {causal[1] / causal[0]:.2f}x" if all(causal) and (not timed or (ca.ran and cb.ran))
                    else "")  # fmt: skip
            r = vb / va
            out.append({"target": f"{impl} {direction} with a window of {w}: {what} from {a.seq} to {b.seq} "
                                  f"grows <= 1.25x as the pairs do ({grow:.2f}x; n^2: {full:.2f}x)",
                        "value": f"{r:.2f}x ({_fmt(va, timed)} -> {_fmt(vb, timed)}){seen}",
                        "met": r <= 1.25 * grow if impl in SKIPS_OUTSIDE_WINDOW else None})  # fmt: skip
    return out


def _fmt(v: float, timed: bool) -> str:
    return f"{v:.3g} s" if timed else human(v)


def plot(rows: list[Row], info: dict, path: Path) -> None:
    """Time, peak memory and traffic against seq, one row of panels per direction (forward; backward when the
    run has backward rows). Filled markers: measured; hollow, dotted: computed. Interpreted times are not drawn."""
    import matplotlib  # lazy: slow to import, and only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as matplotlib, after its backend is chosen

    s = shape_of(llama_config())
    rows = [r for r in rows if r.impl in CORE]  # the core attention; whole-layer rows are in the table
    names = list(dict.fromkeys(r.label for r in rows))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    directions = [d for d in ("forward", "backward") if any(r.direction == d for r in rows)]
    fig, axes = plt.subplots(len(directions), 3, figsize=(17, 5.4 * len(directions)), squeeze=False)
    for axrow, direction in zip(axes, directions, strict=True):
        _panels(axrow, [r for r in rows if r.direction == direction], direction, s, info, colors)
    m = info["machine"]
    on = f"{m['gpu']} ({m.get('device', 'cuda')})" if m.get("gpu") else f"CPU: {m['cpu']}, {m['threads']} threads"
    fig.suptitle(
        f"Llama-3.2-1B attention (B={s.B}, H={s.H}, Hkv={s.Hkv}, d={s.d}, causal, float32) on {on}, "
        f"torch {m['torch']}. Filled: measured; hollow/dotted: computed (cannot run here)",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _panels(axes, rows: list[Row], direction: str, s, info: dict, colors: dict) -> None:
    seqs = sorted({r.seq for r in rows})
    names = list(dict.fromkeys(r.label for r in rows))
    panels = (("median_s", "time per call (s)"), ("peak_bytes", "peak memory of the call (bytes)"),
              ("traffic_bytes", "traffic (bytes; triton: its global loads + stores)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in names:
            if key == "traffic_bytes" and name.split()[0] not in TRAFFIC_PLOTTED:
                continue
            mine = sorted((r for r in rows if r.label == name and getattr(r, key) is not None), key=lambda r: r.seq)
            if key == "median_s":  # the interpreter's time is no kernel's
                mine = [r for r in mine if r.time_method != TIME_INTERPRETED]
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
            flops = cases.backward_flops if direction == "backward" else cases.core_flops
            ax.plot(seqs, [flops(s, n) / rate for n in seqs], "k--", lw=1,
                    label=f"roofline: useful FLOPs at {rate / 1e9:.0f} GFLOP/s")
        if key == "peak_bytes" and info["machine"].get("ram_bytes") and not info["machine"].get("gpu"):
            ax.axhline(info["machine"]["ram_bytes"], color="k", ls="--", lw=1, label="this machine's RAM")
        if key == "traffic_bytes" and direction == "forward":
            ax.plot(seqs, [io_model(s, n)[0] for n in seqs], "--", color="gray", lw=1,
                    label="IO model, standard (4Nd+4N^2)")
            ax.plot(seqs, [io_model(s, n)[1] for n in seqs], "-.", color="gray", lw=1,
                    label="IO model, FlashAttention (M = 227 KB)")
            ax.plot(seqs, [4 * s.B * n * s.d * (2 * s.H + 2 * s.Hkv) for n in seqs], ":", color="k", lw=1,
                    label="compulsory: read q, k, v, write o")
        if key == "traffic_bytes" and direction == "backward":
            ax.plot(seqs, [4 * s.B * n * s.d * (4 * s.H + 4 * s.Hkv) for n in seqs], ":", color="k", lw=1,
                    label="compulsory: read q, k, v, o, dO, write dq, dk, dv")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqs, [str(n) for n in seqs])
        ax.set_xlabel("sequence length")
        ax.set_title(f"{direction}: {label}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)


def markdown(rows: list[Row], info: dict, goals: list[dict]) -> str:
    """The generated block of docs/bench.md: every row of the run, then the targets."""
    m, roof = info["machine"], info["roofline"]
    on = f"{m['gpu']} ({m['device']})" if m.get("gpu") else f"{m['cpu']}, {m['threads']} threads ({m['device']})"
    out = [f"Run on {on}, torch {m['torch']}; float32 matmul {roof['matmul_gflops']:.0f} GFLOP/s, copy "
           f"{roof['copy_gbps']:.1f} GB/s (the roofline, measured in the same run).", "",
           "| impl | direction | seq | time: median (min..max) | GFLOP/s | % of matmul | peak memory | traffic | |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.time_method == TIME_INTERPRETED:
            when = f"{r.median_s:.3g} s (1 call, {TIME_INTERPRETED})"
        else:
            when = f"{r.median_s:.3g} s ({r.min_s:.3g}..{r.max_s:.3g})" if r.ran else "not run"
        rate = f"{r.gflops:.1f} | {100 * r.frac_matmul:.0f}%" if r.gflops else " | "
        peak = human(r.peak_bytes) + _how(r.peak_bytes, r.peak_method)
        traffic = human(r.traffic_bytes) + _how(r.traffic_bytes, r.traffic_method)
        if r.reason:
            note = r.reason
        elif r.time_method == TIME_INTERPRETED:
            note = "interpreted, traffic counted" + (" (== closed form)" if r.extra.get("traffic_count_equals_model")
                                                     else "")  # fmt: skip
        else:
            note = ", ".join(["measured", *([r.extra["backend"]] if r.extra.get("backend") else [])])
        out.append(f"| `{r.label}` | {r.direction} | {r.seq} | {when} | {rate} | {peak} | {traffic} | {note} |")
    out += ["", "Targets:", ""] + ([] if goals else ["- none covered by this run"])
    for t in goals:
        verdict = "n/a" if t["met"] is None else ("**MET**" if t["met"] else "**MISSED**")
        out.append(f"- {t['target']}: {t['value']} ({verdict})")
    return "\n".join(out) + "\n"


def _how(value, method: str) -> str:
    """' (computed)', ' (counted)', ' (closed form)' after a number not measured by the run itself; '' if it was."""
    if value is None or method.startswith("measured"):
        return ""
    return " (closed form)" if method.startswith("closed form") else f" ({method.split(':')[0]})"


# ---------------------------------------------------------------------------------------------------------
# command line


def _seqs(items: list[str]) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in items)
    except ValueError:
        raise UserError(f"--seq {' '.join(items)!r}: give sequence lengths as integers, e.g. --seq 1024 4096") from None
    if min(vals) < 1 or max(vals) > MAX_SEQ:
        raise UserError(f"--seq {' '.join(items)!r}: give sequence lengths between 1 and {MAX_SEQ}")
    return vals


def _impls(items: list[str]) -> tuple[str, ...]:
    bad = [t for t in items if t not in CORE + LAYER]
    if bad:
        raise UserError(f"--impl {','.join(bad)}: unknown; choose from {','.join(CORE + LAYER)}")
    return tuple(dict.fromkeys(items))


def parser() -> Parser:
    p = Parser(prog="attention-verify bench",
               description="Time, peak memory and memory traffic of attention on Llama-3.2-1B's shapes.")
    p.add_argument("--quick", action="store_true",
                   help=f"seq {QUICK_SEQS[0]} only, no interpreted triton (about 30 s on a CPU)")
    p.many("--seq", split=True, help="sequence lengths (default 1024 4096 16384 32768); repeatable, commas too")
    p.many("--impl", split=True, help=f"a subset of {','.join(CORE + LAYER)}; repeatable, commas too")
    p.add_argument("--backward", action="store_true",
                   help=f"also time the backward pass alone (gradients of q, k, v) of {','.join(BACKWARD_ROWS)} (of "
                        f"the --impl ones among {','.join(BACKWARD)}), at seqs up to 4096 unless --seq")  # fmt: skip
    p.number("--window", lo=1, hi=MAX_SEQ, kind=int,
             help="also run the core rows with a sliding window of this many keys (transformers' sliding_window; "
                  "the kernel's window=(W - 1, 0)), beside full causal: rows named 'tiled wW'")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.number("--runs", lo=1, hi=MAX_RUNS, kind=int, default=5,
             help="timed calls per configuration, after warm-up (default 5)")  # fmt: skip
    p.number("--max-config-s", lo=0, hi=WEEK_S, above=True, unit="seconds", default=600.0,
             help="skip a configuration projected to need more seconds for all its calls (default 600)")
    p.number("--max-interpreted-s", lo=0, hi=WEEK_S, above=True, unit="seconds", default=MAX_INTERPRETED_S,
             help="without a GPU triton runs in Triton's interpreter, one call counted: skip a call projected "
                  f"to need more seconds (default {MAX_INTERPRETED_S:g}); its traffic is then the closed form")
    p.add_argument("--json", type=Path, help="write the rows here (default for a full run: docs/bench.json)")
    p.add_argument("--plot", type=Path, help="write the figure here (default for a full run: docs/bench.png)")
    p.add_argument("--doc", type=Path, help="fill this page's generated block with the rows and targets (default for "
                                            "a full run: docs/bench.md)")  # fmt: skip
    p.add_argument("--paged", action="store_true",
                   help="the paged decode bench instead: traffic / KV-cache bytes and time per step of the paged "
                        "built-ins (its own options: bench --paged --help; make bench-paged)")  # fmt: skip
    p.add_argument("--ring", action="store_true",
                   help="the ring bench instead: ring attention on W rank processes against one, time, memory and "
                        "bytes per rank (its own options: bench --ring --help; make bench-ring)")  # fmt: skip
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: redraw the figure (--plot, default docs/bench.png) from --json rows")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--paged" in argv:  # the paged decode bench: its own options (harness/bench/paged.py)
        return paged.main([t for t in argv if t != "--paged"])
    if "--ring" in argv:  # the ring bench: its own options (harness/bench/ring.py)
        return ring.main([t for t in argv if t != "--ring"])
    a = parser().parse_args(argv)
    if a.replot:
        return replot(a.replot, output_path(a.plot or DOCS_PNG, "--plot"))
    opt = options(a)
    full = not (a.quick or a.seq or a.impl or a.window)  # the documented run: it refreshes docs/
    json_path = a.json or (DOCS_JSON if full else None)
    png_path = a.plot or (DOCS_PNG if full else None)
    doc_path = a.doc or (DOCS_MD if full else None)
    for path, option in ((json_path, "--json"), (png_path, "--plot"), (doc_path, "--doc")):
        if path is not None:
            output_path(path, option)
    if doc_path:
        _check_generated_block(doc_path)

    t0 = time.perf_counter()
    rows, info = run(opt)
    goals = targets(rows)
    print("targets:")
    for t in goals:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"  {verdict:6s}  {t['target']}: {t['value']}")
    if json_path:
        for r in rows:
            r.extra.update(matmul_gflops=info["roofline"]["matmul_gflops"], cpu=info["machine"]["cpu"],
                           threads=info["machine"]["threads"], torch=info["machine"]["torch"],
                           ram_bytes=info["machine"]["ram_bytes"])  # fmt: skip
            if info["machine"].get("gpu"):
                r.extra.update(gpu=info["machine"]["gpu"])
        write_json(json_path, [r.json() for r in rows])
        print(f"wrote {json_path}")
    if png_path:
        plot(rows, info, png_path)
        print(f"wrote {png_path}")
    if doc_path:
        update_generated(doc_path, markdown(rows, info, goals))
        print(f"wrote {doc_path} (its generated block)")
    print(f"bench: {len(rows)} rows ({sum(r.ran for r in rows)} measured) in {time.perf_counter() - t0:.0f} s")
    return 0


def options(a) -> Options:
    """The parsed command line -> what to run. --quick leaves out the interpreted triton (Python speed: slow);
    --seq also lets backward rows past 4096, --impl lets whole-layer rows past 4096."""
    device = resolve_device(a.device)
    opt = Options(runs=a.runs, max_config_s=a.max_config_s, device=device, max_interpreted_s=a.max_interpreted_s,
                  window=a.window)  # fmt: skip
    if a.quick:
        opt.seqs = QUICK_SEQS
        if device.type != "cuda":
            opt.impls = tuple(i for i in opt.impls if i not in INTERPRETED)
    if a.seq:
        opt.seqs = _seqs(a.seq)
        opt.backward_any_seq = True
    if a.impl:
        opt.impls = _impls(a.impl)
        opt.layer_any_seq = True
    if a.backward:
        opt.backward = tuple(i for i in opt.impls if i in BACKWARD) if a.impl else BACKWARD_ROWS
        if not opt.backward:
            raise UserError(f"--backward: none of {','.join(opt.impls)} has a backward case; add one of "
                            f"{','.join(BACKWARD)} to --impl")  # fmt: skip
    return opt


def _check_generated_block(path: Path) -> None:
    """Before the run: --doc's page must have the block the run fills (found out now, not after the run)."""
    generated_block(path, "--doc")


def replot(src: Path, png: Path) -> int:
    rows, info = read_rows(src)
    plot(rows, info, png)
    print(f"wrote {png} from {src}")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)
