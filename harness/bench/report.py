"""The report and the command line (`make bench`, scripts/bench.py): the table is printed as rows are measured
(run.py); here the issue's targets evaluated on the rows, the JSON, and the figure (docs/bench.png).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from harness.bench.cases import CORE, LAYER, core_flops, io_model, llama_config, shape_of
from harness.bench.run import QUICK_SEQS, Options, Row, run
from harness.common import DOCS, Parser, UserError, run_cli, write_atomic, write_json
from harness.fixtures.validate import output_path

DOCS_JSON, DOCS_PNG = DOCS / "bench.json", DOCS / "bench.png"


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


def _seqs(items: list[str]) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in items)
    except ValueError:
        raise UserError(f"--seq {' '.join(items)!r}: give sequence lengths as integers, e.g. --seq 1024 4096") from None
    if min(vals) < 1:
        raise UserError(f"--seq {' '.join(items)!r}: sequence lengths must be >= 1")
    return vals


def _impls(items: list[str]) -> tuple[str, ...]:
    bad = [t for t in items if t not in CORE + LAYER]
    if bad:
        raise UserError(f"--impl {','.join(bad)}: unknown; choose from {','.join(CORE + LAYER)}")
    return tuple(dict.fromkeys(items))


def main(argv=None) -> int:
    p = Parser(prog="attention-verify bench",
               description="Time, peak memory and memory traffic of attention on Llama-3.2-1B's shapes.")
    p.add_argument("--quick", action="store_true", help=f"seq {QUICK_SEQS[0]} only (under 2 minutes)")
    p.many("--seq", split=True, help="sequence lengths (default 1024 4096 16384 32768); repeatable, commas too")
    p.many("--impl", split=True, help=f"a subset of {','.join(CORE + LAYER)}; repeatable, commas too")
    p.add_argument("--runs", type=int, default=5, help="timed calls per configuration, after warm-up (default 5)")
    p.add_argument("--max-config-s", type=float, default=600.0,
                   help="skip a configuration projected to need more seconds for all its calls (default 600)")
    p.add_argument("--json", type=Path, help="write the rows here (default for a full run: docs/bench.json)")
    p.add_argument("--plot", type=Path, help="write the figure here (default for a full run: docs/bench.png)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: redraw the figure (--plot, default docs/bench.png) from --json rows")
    a = p.parse_args(argv)
    if a.replot:
        return replot(a.replot, output_path(a.plot or DOCS_PNG, "--plot"))
    if a.runs < 1:
        raise UserError(f"--runs {a.runs}: give at least 1 (5 or more for a median worth reporting)")
    opt = Options(runs=a.runs, max_config_s=a.max_config_s)
    if a.quick:
        opt.seqs = QUICK_SEQS
    if a.seq:
        opt.seqs = _seqs(a.seq)
    if a.impl:
        opt.impls = _impls(a.impl)
        opt.layer_any_seq = True
    full = not (a.quick or a.seq or a.impl)  # the documented run: it refreshes docs/
    json_path = a.json or (DOCS_JSON if full else None)
    png_path = a.plot or (DOCS_PNG if full else None)
    for path, option in ((json_path, "--json"), (png_path, "--plot")):
        if path is not None:
            output_path(path, option)

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
