"""Rows a bench run wrote (--json), read back for --replot: every field the figure reads is checked for its type
first, so a hand-edited or foreign file is one line naming the file, the row and the field (exit 2), never a
traceback inside matplotlib.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness.bench.cases import CORE
from harness.bench.run import DIR, Row
from harness.checkpoints.validate import input_file
from harness.common import UserError

FIX = "give rows written by attention-verify bench --json"
# each None or a finite number >= 0
NUMBERS = ("median_s", "min_s", "max_s", "peak_bytes", "traffic_bytes", "tensor_peak_bytes", "flops", "gflops",
           "frac_matmul", "aten_ops")  # fmt: skip
TEXTS = ("time_method", "peak_method", "traffic_method", "reason")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _check_row(d, where: str) -> None:
    def bad(field: str, want: str):
        shown = repr(d.get(field))[:40]
        raise UserError(f"{where}: {field} is {shown}, not {want}; {FIX}")

    if not isinstance(d, dict):
        raise UserError(f"{where}: a {type(d).__name__}, not an object; {FIX}")
    if not isinstance(d.get("impl"), str):
        bad("impl", "a name")
    if not (isinstance(d.get("seq"), int) and not isinstance(d.get("seq"), bool) and d["seq"] >= 1):
        bad("seq", "a sequence length")
    if not isinstance(d.get("ran"), bool):
        bad("ran", "true or false")
    w = d.get("window")
    if w is not None and not (isinstance(w, int) and not isinstance(w, bool) and w >= 1):
        bad("window", "null or a number of keys")
    if d.get("direction", "forward") not in DIR:
        bad("direction", " or ".join(DIR))
    for k in NUMBERS:
        if d.get(k) is not None and not _number(d[k]):
            bad(k, "a finite number >= 0")
    if d["ran"] and d.get("median_s") is None:
        bad("median_s", "a time (the row ran)")
    for k in TEXTS:
        if not isinstance(d.get(k, ""), str):
            bad(k, "text")
    if not (isinstance(d.get("runs", 0), int) and not isinstance(d.get("runs", 0), bool)):
        bad("runs", "a whole number")


def _check_machine(first: dict, where: str) -> None:
    for k in ("cpu", "torch"):
        if not isinstance(first.get(k), str):
            raise UserError(f"{where}: {k} is {repr(first.get(k))[:40]}, not text; {FIX}")
    for k, required in (("threads", True), ("matmul_gflops", True), ("ram_bytes", False)):
        v = first.get(k)
        if (required or v is not None) and not (_number(v) and v > 0):
            raise UserError(f"{where}: {k} is {repr(v)[:40]}, not a finite number > 0; {FIX}")
    for k in ("gpu", "device"):
        if first.get(k) is not None and not isinstance(first[k], str):
            raise UserError(f"{where}: {k} is {repr(first[k])[:40]}, not text; {FIX}")


def read_rows(src: Path) -> tuple[list[Row], dict]:
    """The rows of --replot's file and the machine they were measured on, checked."""
    input_file(src, "--replot", FIX)
    try:
        docs = json.loads(Path(src).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"--replot {src}: not rows written by bench --json ({type(e).__name__}: {e}); {FIX}") from None
    if not isinstance(docs, list) or not docs:
        raise UserError(f"--replot {src}: not rows written by bench --json (expected a non-empty list); {FIX}")
    for i, d in enumerate(docs):
        _check_row(d, f"--replot {src}: row {i}")
    _check_machine(docs[0], f"--replot {src}: row 0")
    if not any(d["impl"] in CORE for d in docs):
        raise UserError(f"--replot {src}: no row of {', '.join(CORE)}, nothing the figure draws; {FIX}")
    fields = set(Row.__dataclass_fields__) - {"extra"}
    rows = [Row(**{k: v for k, v in d.items() if k in fields}) for d in docs]
    first = docs[0]
    info = {
        "machine": {"cpu": first["cpu"], "threads": first["threads"], "torch": first["torch"],
                    "ram_bytes": first.get("ram_bytes"), "gpu": first.get("gpu"),
                    "device": first.get("device", "cpu")},
        "roofline": {"matmul_gflops": first["matmul_gflops"]},
    }  # fmt: skip
    return rows, info
