"""Replacing a fixture folder safely: one writer at a time (a lock), one atomic step (an exchange), what a killed
writer left cleaned up, and the rules for --out.

--out rules (stated in `extract --help` and docs/fixtures.md):
- a symlink is refused (one line, exit 2), never followed and never replaced: give the folder it points to;
- anything other than a folder (a file, a FIFO) is refused, --force or not;
- a folder that cannot be written (read-only file system, no permission) is refused before the source is read, and a
  write that fails later (a full disk) is one line too: the fixture already there is left as it was.

The lock is `.NAME.lock` beside the folder, held with flock for the whole run and removed when the run ends, however
it ends (a killed run leaves it; the next run takes it and removes it). A process that locked a lock file that was
removed meanwhile sees that it is no longer the file at the path and locks the new one, so removing it never lets two
writers in at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
from pathlib import Path

from harness.common import UserError


def hook(point: str) -> None:
    """Kill points for the crash-safety tests: ATTN_KILL_AT=point kills this process there (SIGKILL, no cleanup),
    as a power cut or an OOM kill would."""
    if os.environ.get("ATTN_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def check_out(out: Path) -> Path:
    """--out before any work: not a symlink, a folder if it exists, inside a folder this process can write."""
    out = Path(out)  # os.path's tests: False, never an exception, for a name too long (validate.output_dir's)
    if os.path.islink(out):
        raise UserError(f"{out}: is a symlink; a fixture is never written through a link nor over one, give --out the "
                        f"folder itself (this one points to {os.readlink(out)})")  # fmt: skip
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    parent = out.absolute().parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UserError(f"{out}: {parent} is not a directory; give --out a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write in {parent} (a read-only file system or no permission); give --out a "
                        "folder you can write")  # fmt: skip
    return out


WHY = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the disk",
       errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
       errno.EPERM: "permission denied"}  # fmt: skip


def write_failed(e: OSError, out: Path) -> UserError:
    """An OSError while writing a fixture -> one line: what happened, that nothing there changed, the fix."""
    why = WHY.get(e.errno, e.strerror or str(e))
    return UserError(f"{out}: cannot write the fixture ({why}); the fixture there, if any, is unchanged; free some "
                     "space or give --out a folder on a writable file system")  # fmt: skip


_held: dict[Path, int] = {}  # fixture folder -> lock depth, in this process


@contextlib.contextmanager
def fixture_lock(out: Path, *, wait: bool = False):
    """One writer per fixture folder: a second extraction to the same --out is refused (one line), or with wait=True
    waited for; whatever a killed writer left (.NAME.tmp-*, .NAME.old-*) is removed once the lock is held, and the
    lock file itself when the lock is released."""
    out = Path(out).absolute()
    if out in _held:  # re-entered by this process (extract holds it across the whole run)
        _held[out] += 1
        try:
            yield
        finally:
            _held[out] -= 1
        return
    check_out(out)
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _take(lock, out, wait)
    except OSError as e:
        raise write_failed(e, out) from None
    try:
        olds = sorted(out.parent.glob(f".{out.name}.old-*"))
        if olds and not out.exists():  # killed between the two renames of the fallback: put the old one back
            os.rename(olds.pop(), out)
        for left in list(out.parent.glob(f".{out.name}.tmp-*")) + olds:
            remove(left)  # a killed run's: no writer can be using them now
        _held[out] = 1
        hook("locked")
        try:
            yield
        finally:
            del _held[out]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: whoever locks this file next sees it gone and takes a new one
        os.close(fd)  # releases the lock (a killed process releases it too)


def _take(lock: Path, out: Path, wait: bool) -> int:
    """flock the lock file -> its descriptor; retried when the file locked is no longer the one at the path."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out}: another extraction is writing this fixture now (lock {lock}); wait for it to "
                            "finish or give another --out") from None  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        try:
            st, mine = os.stat(lock, follow_symlinks=False), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the writer before removed it as it finished: lock the file at the path now


def remove(path: Path) -> None:
    """A leftover folder, or a link or file in its place (never followed), removed; errors ignored."""
    with contextlib.suppress(OSError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Put the directory tmp at out in one atomic step. If out exists the two are exchanged (renameat2
    RENAME_EXCHANGE), so a kill at any instant leaves at out the complete old fixture or the complete new one;
    tmp then holds the old one, for the caller to remove."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"  # no renameat2 here: two renames (a kill between them
    os.rename(out, old)  # leaves the old fixture in .NAME.old-*, which the next run's lock puts back)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))
