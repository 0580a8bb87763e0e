"""extract --out edge cases: a symlink is refused and nothing is left beside it; the lock file goes when the run ends
(clean or failed) while a concurrent writer is still refused; a read-only or full file system is one line, exit 2,
with the fixture already there intact."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading

import pytest
from conftest import one_line_error, run

from harness.checkpoints import format as fx
from harness.checkpoints import publish
from harness.checkpoints.extract import extract

CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 300, "intermediate_size": 32,
          "max_position_embeddings": 4096, "rope_theta": 10000.0}  # fmt: skip
QUIET = {"log": lambda *_: None}


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(CONFIG))
    return p


def leftovers(folder, name="fx") -> list[str]:
    """What a writer of `name` may leave beside it: .NAME.tmp-*, .NAME.old-*, .NAME.lock."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def snapshot(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def extract_cli(cfg, out, *more):
    return run(["scripts/extract.py", "--synthetic", "--config", str(cfg), "--out", str(out), *more])


def test_a_clean_extraction_leaves_no_lock_file(tmp_path, cfg):
    out = tmp_path / "fx"
    extract(layer=0, out=out, config_path=cfg, synthetic=True, **QUIET)
    extract(layer=0, out=out, config_path=cfg, synthetic=True, seed=1, force=True, **QUIET)  # a replacement too
    assert leftovers(tmp_path) == []
    fx.load_fixture(out)


@pytest.mark.parametrize("target", ["fixture", "dangling", "empty_dir"])
def test_out_that_is_a_symlink_is_refused_and_nothing_is_left(tmp_path, cfg, target):
    """The rule (extract --help, docs/fixtures.md): a symlink at --out is refused, never followed or replaced."""
    real = tmp_path / "real"
    if target == "fixture":
        extract(layer=0, out=real, config_path=cfg, synthetic=True, **QUIET)
    elif target == "empty_dir":
        real.mkdir()
    before = snapshot(real) if real.exists() else None
    link = tmp_path / "L"
    link.symlink_to(real)
    for force in ([], ["--force"]):
        p = extract_cli(cfg, link, *force)
        assert p.returncode == 2 and "is a symlink" in one_line_error(p) and str(link) in p.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (snapshot(real) if real.exists() else None) == before
    assert leftovers(tmp_path, "L") == [] and leftovers(tmp_path, "real") == []


def test_out_that_is_a_file_is_refused_even_with_force(tmp_path, cfg):
    f = tmp_path / "fx"
    f.write_text("not a fixture")
    p = extract_cli(cfg, f, "--force")
    assert p.returncode == 2 and "exists and is not a directory" in one_line_error(p)
    assert f.read_text() == "not a fixture" and leftovers(tmp_path) == []


def _fail_mkdtemp(err):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize("err, says", [(errno.EROFS, "the file system is read-only"),
                                       (errno.ENOSPC, "no space left on the disk")])  # fmt: skip
def test_read_only_or_full_file_system(tmp_path, cfg, monkeypatch, err, says):
    """The write path fails (the temporary folder cannot be made; or, full, the second file's fsync fails): one line,
    exit 2, the fixture there unchanged, no temporary folder and no lock file left."""
    out = tmp_path / "fx"
    extract(layer=0, out=out, config_path=cfg, synthetic=True, **QUIET)
    before = snapshot(out)
    if err == errno.EROFS:
        monkeypatch.setattr(fx.tempfile, "mkdtemp", _fail_mkdtemp(err))
    else:
        calls, real = {"n": 0}, os.fsync

        def full(fd):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(err, os.strerror(err))
            real(fd)

        monkeypatch.setattr(fx.os, "fsync", full)
    p = extract_cli(cfg, out, "--seed", "3", "--force")
    line = one_line_error(p)
    assert p.returncode == 2 and str(out) in line and says in line and "unchanged" in line, line
    assert snapshot(out) == before and leftovers(tmp_path) == []
    fx.load_fixture(out)


def test_lock_file_that_cannot_be_made(tmp_path, cfg, monkeypatch):
    real = os.open

    def ro(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(publish.os, "open", ro)
    p = extract_cli(cfg, tmp_path / "fx")
    assert p.returncode == 2 and "the file system is read-only" in one_line_error(p)


def test_a_folder_that_cannot_be_written_is_refused_before_the_source_is_read(tmp_path, cfg, monkeypatch):
    monkeypatch.setattr(publish.os, "access", lambda *a, **k: False)  # as on a read-only mount
    p = extract_cli(cfg, tmp_path / "sub" / "fx")
    assert p.returncode == 2 and f"cannot write in {tmp_path}" in one_line_error(p)
    assert not (tmp_path / "sub").exists()


def test_removing_the_lock_file_never_lets_two_writers_in(tmp_path):
    """The race removing a lock file opens: a waiter that locked the file just removed must not proceed while a
    newer writer holds the file now at the path. Here: A holds .fx.lock; the waiter W opens it and waits; A removes
    it and C locks a new one at the path; A releases. W then holds a lock on a removed file: it must see that, and
    wait for C."""
    out = tmp_path / "fx"
    lock = tmp_path / ".fx.lock"
    a = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(a, fcntl.LOCK_EX)
    entered, done = threading.Event(), threading.Event()

    def waiter():
        with publish.fixture_lock(out, wait=True):
            entered.set()
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    for _ in range(200):  # until W has the file open and waits on it
        if any(os.path.realpath(f"/proc/self/fd/{fd}") == str(lock) for fd in _fds() if fd != a):
            break
        threading.Event().wait(0.01)
    os.unlink(lock)
    c = os.open(lock, os.O_RDWR | os.O_CREAT)  # the newer writer C
    fcntl.flock(c, fcntl.LOCK_EX)
    os.close(a)  # A releases: W gets the removed file's lock
    assert not entered.wait(0.5), "the waiter went in while C held the lock"
    os.unlink(lock)
    os.close(c)
    assert done.wait(10) and entered.is_set()
    assert not lock.exists()


def _fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]
