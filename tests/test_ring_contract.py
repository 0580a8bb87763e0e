"""The ring contract (issue 28): `verify --ring` runs a kernel on W = 2 and 4 rank processes, gathers what they return
and compares it with transformers on the whole sequence; faults are verdicts naming ranks; bytes are counted; under
torchrun the launched processes are the ranks. Plug-ins written for these tests (tests/plugins/ring_ref.py, apart
from impl/ and the bug catalog) pass, or fail with their stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line_error, run

from harness.verify import ring_cases
from harness.verify.run import main as verify_main

REF = "tests/plugins/ring_ref.py"


def verify(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / f"v{len(list(tmp_path.iterdir()))}.json"
    rc = verify_main([*args, "--json", str(out)])
    return rc, json.loads(out.read_text())


def verdicts(doc: dict) -> dict:
    return {(v["fixture"], v["impl"]): v for v in doc["verdicts"]}


def worker_pids() -> list[int]:
    """Processes on this machine running a harness worker whose ancestor is this test process."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"harness.verify.worker" in cmd or b"harness.verify.isolation" in cmd:
            p = int(pid)
            while p > 1:
                if p == me:
                    found.append(int(pid))
                    break
                try:
                    p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    break
    return found


@pytest.mark.gate  # make verify runs the built-ins on every CI run too; this checks the bytes exactly
def test_builtins_pass_on_2_and_4_ranks_with_the_ideal_bytes(tmp_path):
    """ring, ring_zigzag and allgather, forward and backward: every case passes, and each rank's bytes sent equal
    the ideal computed here from the shapes: (W - 1) x its K and V shard bytes (allgather's all_gather moves the same
    bytes; its cost is memory, docs/ring.md)."""
    rc, doc = verify(tmp_path, "--ring", "ring", "--ring", "ring_zigzag", "--ring", "allgather", "--quick",
                     "--dtype", "float32", "--grad")  # fmt: skip
    assert rc == 0
    vs = verdicts(doc)
    assert {(f, i) for f, i in vs} == {(f"ring-w{w}", i) for w in (2, 4) for i in ("ring", "ring_zigzag", "allgather")}
    for (target, name), v in vs.items():
        assert v["passed"], (target, name, v["hint"])
        W = int(target.removeprefix("ring-w"))
        for case, per_rank in v["comm"]["cases"].items():
            s = next(x for x in ring_cases.SCENARIOS if x.name == case.split("/")[0])
            padded = -(-s.S // (2 * W)) * (2 * W)
            ideal = (W - 1) * 2 * s.B * s.Hkv * (padded // W) * s.d * 4  # float32
            assert [r["bytes_sent"] for r in per_rank] == [ideal] * W, (target, name, case)
        assert v["comm"]["comm_ratio"] == 1.0
    layouts = {name: {r["scenario"].split("/")[1] for r in doc["results"] if r["impl"] == name} for _, name in vs}
    assert layouts == {"ring": {"contiguous"}, "ring_zigzag": {"zigzag"}, "allgather": {"contiguous", "zigzag"}}
    grads = {r["check"] for r in doc["results"] if r["check"].startswith("grad_")}
    assert grads == {"grad_q", "grad_k", "grad_v"}


@pytest.mark.gate
def test_a_plain_kernel_passes_and_declares_its_layouts(tmp_path):
    """A kernel with no `layouts` runs contiguous only; one returning out alone is judged on out. The bug catalog's
    textbook ring (its bugs are its steps swapped) passes too."""
    rc, doc = verify(tmp_path, "--ring", f"{REF}:gather_attn", "--ring", f"{REF}:out_only", "--ring",
                     "harness.bugs.ring:textbook", "--quick", "--dtype", "float32,bfloat16")  # fmt: skip
    assert rc == 0, [v["hint"] for v in doc["verdicts"]]
    assert len(doc["verdicts"]) == 6 and all(v["passed"] for v in doc["verdicts"])
    rows = doc["results"]
    assert {r["scenario"].split("/")[1] for r in rows if r["impl"].endswith(":out_only")} == {"contiguous"}
    assert {r["scenario"].split("/")[1] for r in rows if r["impl"].endswith(":gather_attn")} == {"contiguous", "zigzag"}
    assert any(r["check"] == "lse" for r in rows if r["impl"].endswith(":gather_attn"))
    assert not any(r["check"] == "lse" for r in rows if r["impl"].endswith(":out_only"))
    assert any(r["dtype"] == "bfloat16" and r["scenario"].startswith("bfloat16/") for r in rows)


@pytest.mark.gate
def test_a_rank_that_raises_is_named_and_no_process_remains(tmp_path):
    rc, doc = verify(tmp_path, "--ring", f"{REF}:raises_on_rank_1", "--quick", "--dtype", "float32",
                     "--timeout", "60")  # fmt: skip
    assert rc == 1
    for target in ("ring-w2", "ring-w4"):
        v = verdicts(doc)[(target, f"{REF}:raises_on_rank_1")]
        assert v["stage"] == "crash" and v["hint"].startswith("rank 1 of "), v["hint"]
        assert "ValueError: rank 1 cannot go on" in v["hint"]
    assert worker_pids() == []


@pytest.mark.gate
def test_exit_deadlock_and_lies_are_verdicts_naming_ranks(tmp_path):
    """A rank that exits (its peers' transport errors are echoes, not the cause), a deadlock (every rank waiting),
    one rank that never returns, ranks that disagree on returning the lse."""
    rc, doc = verify(tmp_path, *[x for f in ("exits_on_last_rank", "deadlocks", "rank_0_hangs", "half_lse")
                                 for x in ("--ring", f"{REF}:{f}")], "--quick", "--dtype", "float32",
                     "--timeout", "12")  # fmt: skip
    assert rc == 1
    vs = verdicts(doc)
    for W in (2, 4):
        t = f"ring-w{W}"
        v = vs[(t, f"{REF}:exits_on_last_rank")]
        assert v["stage"] == "crash" and v["hint"].startswith(f"rank {W - 1} of {W}:") and "code 3" in v["hint"]
        v = vs[(t, f"{REF}:deadlocks")]
        assert v["stage"] == "timeout", v["hint"]
        assert v["hint"].startswith(f"ranks {', '.join(map(str, range(W)))} of {W} never returned"), v["hint"]
        v = vs[(t, f"{REF}:rank_0_hangs")]
        assert v["stage"] == "timeout" and v["hint"].startswith(f"rank 0 of {W} never returned"), v["hint"]
        assert vs[(t, f"{REF}:half_lse")]["stage"] == "contract"
    assert worker_pids() == []


# each plug-in mistake (tests/plugins/ring_ref.py) and the stage its verdict must name, on both W (nine)
MISTAKES = {
    "future_ranks_seen": "ring_mask",
    "allgather_zigzag_blind": "ring_mask",
    "own_keys_dropped": "ring_order",
    "blocks_rotated": "ring_order",
    "halves_summed": "ring_merge",
    "scale_ignored": "scale",
    "kv_heads_tiled": "gqa",
    "outputs_rolled": "ring_order",
}


@pytest.mark.gate
def test_mistakes_written_apart_from_the_catalog_get_their_stage(tmp_path):
    rc, doc = verify(tmp_path, *[x for f in MISTAKES for x in ("--ring", f"{REF}:{f}")], "--quick", "--dtype",
                     "float32")  # fmt: skip
    assert rc == 1
    got = {(t, i.split(":")[1]): v["stage"] for (t, i), v in verdicts(doc).items()}
    assert got == {(f"ring-w{w}", f): stage for w in (2, 4) for f, stage in MISTAKES.items()}


@pytest.mark.slow
def test_torchrun_ranks_verify_the_builtin(tmp_path):
    """`torchrun --nproc-per-node 2 -m harness verify --ring ring`: the launched processes are the ranks; rank 0
    reports (one table), every rank exits 0."""
    out = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "harness",
                        "verify", "--ring", "ring", "--quick", "--dtype", "float32", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count(" passed, 0 failed") == 1
    doc = json.loads(out.read_text())
    assert [(v["fixture"], v["impl"], v["passed"]) for v in doc["verdicts"]] == [("ring-w2", "ring", True)]
    assert doc["verdicts"][0]["comm"]["comm_ratio"] == 1.0


@pytest.mark.gate
def test_torchrun_names_the_rank_that_raised(tmp_path):
    out = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "harness",
                        "verify", "--ring", f"{REF}:raises_on_rank_1", "--quick", "--dtype", "float32",
                        "--timeout", "10", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode != 0
    v = json.loads(out.read_text())["verdicts"][0]
    assert v["stage"] == "crash" and v["hint"].startswith("rank 1 of 2: raised ValueError"), v["hint"]


def test_bad_input_is_one_line(tmp_path):
    for spec, words in (("no_such_kernel", "unknown ring kernel 'no_such_kernel'"),
                        ("tests/plugins/nowhere.py:attn", "no such file")):  # fmt: skip
        p = run(["-m", "harness", "verify", "--ring", spec])
        assert p.returncode == 2 and words in one_line_error(p)


def test_layouts_cut_and_glue_back():
    """The judge's own layouts: every token exactly once; zigzag's rank r holds chunks r and 2W - 1 - r."""
    x = torch.arange(2 * 3 * 16 * 1, dtype=torch.float32).reshape(2, 3, 16, 1)
    for W in (1, 2, 4):
        for layout in ring_cases.LAYOUTS:
            parts = ring_cases.shard(x, W, layout)
            assert torch.equal(ring_cases.unshard(parts, layout), x)
    assert ring_cases.tokens(16, 4, "zigzag", 1).tolist() == [2, 3, 12, 13]
    assert ring_cases.tokens(16, 4, "contiguous", 1).tolist() == [4, 5, 6, 7]
