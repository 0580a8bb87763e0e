"""Where a worker runs: the walls between the judge, the code it judges, and the other implementations.

On Linux, each worker is started by util-linux's `unshare` in namespaces of its own:

    user namespace     its root is root only inside: no capability over the judge or another worker, so it can
                       neither open their /proc/PID/mem nor ptrace them (whatever uid the judge runs as)
    PID namespace      it is PID 1 of a world holding only itself and what it starts: the judge and the other
                       workers have no PID it can name, so it cannot signal them (kill, pidfd, /proc)
    mount namespace    a /proc of that world only: no other process is even listed
    ending             the judge ends a worker by SIGKILL to its PID 1 (seen from here), which ends every process
                       of the namespace, `setsid` and double forks included; parent-death signals (`setpriv`
                       on `unshare`, `--kill-child`, prctl in the init and the worker) end it when the judge dies

The judge also makes itself non-dumpable (`PR_SET_DUMPABLE` 0: a same-uid process without capabilities cannot
open its memory), and each worker does the same before importing the code (another worker cannot open its memory
either). Where `unshare` or user namespaces are missing (another OS, a container that forbids them), workers run
as plain child processes in their own session and `available()` says why: a worker can then signal the judge and
its siblings, and, run as root, read and write their memory (README, "What the harness cannot stop").
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import cache

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
UNSHARE = ("--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc")
MECHANISM = "user, PID and mount namespaces per worker (unshare)"


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def protect_self() -> bool:
    """Make this process non-dumpable: a process without capabilities over it cannot open its memory or ptrace it.
    The judge calls it once; a worker calls it before importing the code under test."""
    return _prctl(PR_SET_DUMPABLE, 0)


def die_with_parent() -> bool:
    """SIGKILL to this process when its parent dies (however it dies). A worker calls it first thing; `unshare` gets
    it from util-linux's `setpriv --pdeathsig` (no Python runs between fork and exec in a judge with threads)."""
    return _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@cache
def unavailable() -> str | None:
    """None when workers get namespaces here; else why not (one line). Probed once per process (a few ms)."""
    if os.environ.get("ATTN_NAMESPACES") == "0":  # a platform where they break something (a driver): stated
        return "turned off by ATTN_NAMESPACES=0"
    if not sys.platform.startswith("linux"):
        return f"namespaces are Linux-only (this is {sys.platform})"
    tool = shutil.which("unshare")
    if tool is None:
        return "util-linux's `unshare` is not installed"
    try:
        p = subprocess.run([tool, *UNSHARE, "true"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare` did not run ({e})"
    if p.returncode != 0:
        why = " ".join(p.stderr.decode(errors="replace").split())[:200]
        return f"user namespaces are not permitted here (unshare: {why or p.returncode})"
    return None


def mechanism() -> str:
    """How workers are isolated on this machine, for the report and the JSON."""
    why = unavailable()
    return MECHANISM if why is None else f"own session only ({why})"


@dataclass
class Process:
    """A started worker: `proc` is what this process waits on (`unshare`, or the worker itself without namespaces);
    `status` the read end of the pipe on which the namespace's init reports how the worker ended."""

    proc: subprocess.Popen
    status: int | None

    def exit_code(self) -> int | None:
        """The worker's own exit status (negative: killed by that signal), once it has ended."""
        code = self.proc.poll()
        if code is None or self.status is None:
            return code
        try:
            data = os.read(self.status, 4)
        except OSError:  # nothing written (init killed): the wait status is all there is
            data = b""
        return struct.unpack("<i", data)[0] if len(data) == 4 else code

    def close(self) -> None:
        if self.status is not None:
            os.close(self.status)
            self.status = None


def spawn(argv: list[str], *, env: dict, log, pass_fds: tuple[int, ...]) -> Process:
    """Start a worker: argv run in its namespaces where they are available, under an init (`init` below) so that
    the code is never PID 1 (the kernel drops the signals PID 1 sends itself). stdin is /dev/null; stdout and stderr
    go to `log`; the protocol travels on pass_fds (never 0-2, so code that reads stdin or prints cannot touch it)."""
    kw = dict(stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    if unavailable() is not None:
        return Process(subprocess.Popen(argv, pass_fds=pass_fds, **kw), None)
    r, w = os.pipe()
    os.set_blocking(r, False)
    setpriv = shutil.which("setpriv")
    try:
        init = [sys.executable, "-m", "harness.verify.isolation", str(w), *argv]
        wrap = [setpriv, "--pdeathsig", "KILL"] if setpriv else []  # unshare dies with the judge
        proc = subprocess.Popen([*wrap, shutil.which("unshare"), *UNSHARE, *init], pass_fds=(*pass_fds, w), **kw)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Process(proc, r)


def init(status_fd: int, argv: list[str]) -> None:
    """PID 1 of a worker's namespace: run argv as its only child, reap whatever is orphaned to it, and when the
    child ends report its exit status (4 bytes) on status_fd and exit, which ends every other process there."""
    die_with_parent()  # `unshare` gone (the judge killed): this init, and with it the namespace
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.closerange(3, status_fd)  # the protocol's descriptors belong to the worker alone: its death is EOF
    os.closerange(status_fd + 1, os.sysconf("SC_OPEN_MAX"))
    protect_self()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            os.write(status_fd, struct.pack("<i", os.waitstatus_to_exitcode(status)))
            os._exit(0)


def kill(p: Process) -> None:
    """End a worker and everything it started. In namespaces: SIGKILL to the namespace's PID 1 (the child of
    `unshare`), which the kernel turns into SIGKILL for every process in it; then `unshare` and its group."""
    proc = p.proc
    for pid in _children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    """The PIDs of pid's children (Linux: /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


if __name__ == "__main__":
    init(int(sys.argv[1]), sys.argv[2:])
