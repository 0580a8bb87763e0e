"""The boundary, closed: a plug-in cannot write the judge's memory, signal it or its siblings, lie about its
output, or outlive its verdict (harness/verify/isolation.py, worker.py).

Each attack is a plug-in of tests/plugins/attacks.py, run as a user runs `verify` (a process of its own, through
tests/verify_driver.py). The attacks are real: run without namespaces (ATTN_NAMESPACES=0, what a platform without
them gives), the memory attack makes a wrong implementation's rows pass and the sibling attack kills an innocent
worker; in namespaces, every verdict is what it is without them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, one_line_error, run

from harness.verify import isolation

ATTACKS = "tests/plugins/attacks.py"
INNOCENT = "tests/plugins/hostile.py:attention"
QUICK = ["--fixture", "smollm2-135m", "--quick", "--dtype", "float32"]


def driver(tmp_path, *args, env=None, timeout=600):
    """verify in a process of its own -> (process, JSON document or None). HOSTILE_MARK: its --json path, unique,
    the only command line the attacks may look for (they never reach another process on this machine)."""
    out = tmp_path / f"v-{uuid.uuid4().hex}.json"
    env = {"HOSTILE_MARK": str(out), **(env or {})}
    p = run(["tests/verify_driver.py", *args, "--json", str(out)], env=env, timeout=timeout)
    doc = json.loads(out.read_text()) if out.exists() else None
    return p, doc


def rows_of(doc, impl) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in doc["results"] if r["impl"] == impl]


def verdicts(doc) -> dict:
    return {v["impl"]: v for v in doc["verdicts"]}


def processes_with(text: str) -> list[str]:
    """Command lines of the processes on this machine that contain text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line and str(os.getpid()) != pid:
            found.append(f"{pid}: {line}")
    return found


def test_workers_get_namespaces_here():
    """The isolation the other tests rely on is there (this machine: Linux, util-linux's unshare, user namespaces)."""
    assert isolation.unavailable() is None, (
        f"workers run without namespaces here: {isolation.unavailable()}; install util-linux (unshare) and allow "
        "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0)")
    assert isolation.mechanism() == isolation.MECHANISM


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_the_attacks_are_real_without_namespaces(tmp_path):
    """Without namespaces, the memory attack bends rows of a wrong implementation into passes and the sibling
    attack kills the innocent's worker: what the tests below show cannot happen in namespaces."""
    log = tmp_path / "attacks.log"
    p, doc = driver(tmp_path, *QUICK, "--impl", f"{ATTACKS}:rewrites_judge_memory", "--impl",
                    f"{ATTACKS}:kills_siblings", "--impl", INNOCENT,
                    env={"ATTN_NAMESPACES": "0", "HOSTILE_LOG": str(log)})  # fmt: skip
    said = log.read_text()
    assert "rewrote 1 floats" in said and "killed" in said, said
    assert "note: workers run without namespaces here (turned off by ATTN_NAMESPACES=0)" in p.stdout
    assert doc["isolation"] == "own session only (turned off by ATTN_NAMESPACES=0)"
    bent = [r for r in doc["results"] if r["impl"].endswith(":rewrites_judge_memory") and r["passed"]]
    assert bent and all(r["tolerance"] >= 1e29 for r in bent)  # output x 2 "passed" under a rewritten tolerance
    assert verdicts(doc)[INNOCENT]["stage"] == "crash", verdicts(doc)[INNOCENT]


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_attacks_in_namespaces_change_no_verdict(tmp_path):
    """The memory rewrite, the sibling kill and every signal to the judge, in one run: the innocent's rows are
    exactly its rows alone, the wrong implementation fails every row, the run completes with its JSON."""
    _, alone = driver(tmp_path, *QUICK, "--impl", INNOCENT)
    log = tmp_path / "attacks.log"
    signals = ["sigkills_judge", "sigstops_judge", "sigterms_judge", "sigints_judge", "sigusr1s_judge"]
    attacks = ["rewrites_judge_memory", "kills_siblings", *signals]
    args = [a for name in attacks for a in ("--impl", f"{ATTACKS}:{name}")]
    p, doc = driver(tmp_path, *QUICK, *args, "--impl", INNOCENT, env={"HOSTILE_LOG": str(log)}, timeout=300)
    assert doc is not None and p.returncode == 1, p.stderr[-3000:]  # 1: the wrong one fails; nothing else
    assert doc["isolation"] == isolation.MECHANISM and "without namespaces" not in p.stdout
    said = log.read_text()
    assert "rewrote" not in said and "killed" not in said and "sent" not in said, said
    assert rows_of(doc, INNOCENT) == rows_of(alone, INNOCENT) and rows_of(alone, INNOCENT)
    v = verdicts(doc)
    wrong = [r for r in doc["results"] if r["impl"].endswith(":rewrites_judge_memory")]
    assert wrong and not any(r["passed"] for r in wrong) and all(r["tolerance"] < 1 for r in wrong)
    for name in ("kills_siblings", *signals):  # correct code: its attack reached nothing, it passes
        assert v[f"{ATTACKS}:{name}"]["passed"] is True, v[f"{ATTACKS}:{name}"]


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_nothing_outlives_its_verdict(tmp_path):
    """A module whose build() leaves a setsid, double-forked process behind, and a worker that clears its
    parent-death signal and hangs past --timeout: after the run, no process of either is left."""
    mark = f"hostile-{uuid.uuid4().hex}"
    p, doc = driver(tmp_path, *QUICK, "--module", f"{ATTACKS}:outlives_its_verdict", "--impl",
                    f"{ATTACKS}:pdeathsig_cleared", "--timeout", "20", env={"HOSTILE_SLEEPER": mark})  # fmt: skip
    v = verdicts(doc)
    assert v[f"{ATTACKS}:outlives_its_verdict"]["passed"] is True
    assert v[f"{ATTACKS}:pdeathsig_cleared"]["stage"] == "timeout"
    time.sleep(0.5)
    assert not processes_with(mark), processes_with(mark)
    assert not processes_with(f"{ATTACKS}:"), processes_with(f"{ATTACKS}:")


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_a_huge_reply_is_refused_unread(tmp_path):
    """1.6 GB of the wrong shape: `contract` after reading its 16-byte prefix; the judge's peak memory grows by
    no more than a run of a correct implementation makes it grow."""
    p = run(["tests/verify_driver.py", *QUICK, "--impl", INNOCENT, "---", *QUICK, "--impl",
             f"{ATTACKS}:huge_reply", "--json", str(tmp_path / "v.json")], env={}, timeout=600)  # fmt: skip
    growth = [int(line.split()[2]) for line in p.stderr.splitlines() if line.startswith("peak growth:")]
    assert len(growth) == 2, p.stderr[-2000:]
    assert growth[1] < 32 * 1024, f"the judge's peak memory grew by {growth[1]} kB reading a refused reply"
    (v,) = json.loads((tmp_path / "v.json").read_text())["verdicts"]
    assert v["stage"] == "contract" and "1600000" in v["hint"] and "nothing more was read" in v["hint"], v


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_the_judge_believes_only_what_it_checks(tmp_path):
    """Replies that lie about their tensors, a 1-tuple, a quantized tensor: `contract`; code that reads stdin
    reads nothing and passes; a forged error at import and an import that raises are verdicts for those
    implementations alone, and the others are judged."""
    want = {"lies_about_shape": ("contract", "carries a tensor [] float32"),
            "lies_about_dtype": ("contract", "carries a tensor [1, 1, 576] float64"),
            "one_tuple": ("contract", "tuple of 1"),
            "quantized": ("contract", "qint8")}  # fmt: skip
    log = tmp_path / "attacks.log"
    args = [a for name in [*want, "reads_stdin"] for a in ("--impl", f"{ATTACKS}:{name}")]
    p, doc = driver(tmp_path, *QUICK, *args, "--impl", "tests/plugins/forges_at_import.py:attention", "--impl",
                    "tests/plugins/raises_at_import.py:attention", "--impl", "json:no_such_function", "--impl",
                    INNOCENT, env={"HOSTILE_LOG": str(log)})  # fmt: skip
    assert p.returncode == 1 and "the fixture is corrupt" not in p.stderr, p.stderr[-2000:]
    v = verdicts(doc)
    for name, (stage, words) in want.items():
        got = v[f"{ATTACKS}:{name}"]
        assert (got["passed"], got["stage"]) == (False, stage) and words in got["hint"], got
    assert v[f"{ATTACKS}:reads_stdin"]["passed"] is True and "read 0 bytes" in log.read_text()
    forged = v["tests/plugins/forges_at_import.py:attention"]
    assert forged["stage"] == "crash" and forged["hint"].startswith("importing tests/plugins/forges_at_import.py")
    raised = v["tests/plugins/raises_at_import.py:attention"]
    assert raised["stage"] == "crash" and "ImportError: this plug-in needs a library" in raised["hint"]
    missing = v["json:no_such_function"]
    assert missing["stage"] == "crash" and "has no callable 'no_such_function'" in missing["hint"]
    assert v[INNOCENT]["passed"] is True


@pytest.mark.parametrize("spec, needle", [
    (":attention", "no module before ':'"),
    (f"{ATTACKS}:", "is not a Python name"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("a..b:f", "is not a module name"),
])  # fmt: skip
def test_malformed_specs_are_exit_2_before_any_work(spec, needle):
    p = run(["-m", "harness", "verify", "--quick", "--impl", spec])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert needle in one_line_error(p)


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_from_outside_ends_the_run_like_ctrl_c(tmp_path, sig):
    """What a CI cancel sends, while a worker is busy: one line, the workers ended, the JSON holds what was
    judged (marked stopped), exit code 128 + the signal."""
    log, out = tmp_path / "attacks.log", tmp_path / "v.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOSTILE_LOG": str(log)}
    args = [*QUICK, "--impl", INNOCENT, "--impl", f"{ATTACKS}:hangs", "--json", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "harness", "verify", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (log.exists() and "hanging" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {signal.Signals(sig).name}" in one_line_error(stderr)
    doc = json.loads(out.read_text())
    assert doc["stopped"] == signal.Signals(sig).name
    assert verdicts(doc)[INNOCENT]["passed"] is True and f"{ATTACKS}:hangs" not in verdicts(doc)
    time.sleep(0.5)
    assert not processes_with(f"{ATTACKS}:hangs"), processes_with(f"{ATTACKS}:hangs")


@pytest.mark.gate  # spawns and attacks many workers: the CI gate (make test-gate)
def test_a_killed_judge_leaves_no_worker(tmp_path):
    """SIGKILL to the judge (nothing of it runs after): its busy worker and that worker's namespace end with it."""
    log = tmp_path / "attacks.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOSTILE_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "verify", *QUICK, "--impl", f"{ATTACKS}:hangs"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (log.exists() and "hanging" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(f"{ATTACKS}:hangs")
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while processes_with(f"{ATTACKS}:hangs") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_with(f"{ATTACKS}:hangs"), processes_with(f"{ATTACKS}:hangs")
