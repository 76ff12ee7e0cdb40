"""Every failure a user's machine can throw at lacd gives one line, never a traceback, and no
restart loop: what a restart cannot fix ends `lacd run` with status 2 (the units do not restart
it); what passes by itself keeps the daemon up, backing off as it says, and `lacd status` shows it.

Tests run as root, who reads and writes anything: an unreadable file or a state dir of another
owner is made real by starting lacd without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from
the bounding set before exec, so uid 0 is held to file modes like any user). A read-only state dir
and a full disk are a real tmpfs mounted read-only / 4 MiB small (skipped where mount is refused).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import agent_line, lacd_env, run_cli, wait_until

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def as_a_user():
    """preexec_fn: this process and what it execs obey file permissions, as uid 0 without privileges."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def lacd(*args: str, env: dict, unprivileged: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lacd", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=as_a_user if unprivileged else None)


class Daemon:
    """`lacd run` in the background, its JSON log lines in a file."""

    def __init__(self, env: dict, tmp_path: Path, unprivileged: bool = False):
        self.log = tmp_path / "daemon.log"
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, preexec_fn=as_a_user if unprivileged else None)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.proc.kill()
            self.out.close()


def fast_env(tmp_path: Path, log: Path, **extra) -> dict:
    return lacd_env(tmp_path, log, LACD_WATCH_POLL_INTERVAL="0.1", LACD_WATCH_ROTATE_WAIT="0.3",
                    LACD_CURATION_DUPLICATE="false", **extra)


def status(env) -> dict:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def daemon_line(env) -> str:
    return run_cli("status", env=env).stdout.splitlines()[0]


def lines(*ids: int) -> str:
    return "".join(agent_line(i) + "\n" for i in ids)


@contextmanager
def mounted_tmpfs(where: Path, options: str):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount is not allowed here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


# -- the state dir ------------------------------------------------------------------------------------


def test_a_state_dir_under_a_regular_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    state = tmp_path / "file" / "state"
    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl", LACD_STATE_DIR=str(state))
    for command in ("run", "ingest", "migrate"):
        result = lacd(command, env=env)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"lacd: cannot create the state dir {state}: Not a directory; set [state] dir to a "
                                 "folder this user can write\n")
    env["LACD_STATE_DIR"] = str(tmp_path / "file")
    result = lacd("run", env=env)
    assert (result.returncode, result.stderr) == (2, f"lacd: the state dir {tmp_path / 'file'} is a file, not a "
                                                     "directory; set [state] dir to a folder this user can write\n")


def test_a_state_dir_owned_by_another_user_is_refused_in_one_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # nobody's
    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl")
    for command in ("run", "ingest"):
        result = lacd(command, env=env, unprivileged=True)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"lacd: cannot write the state dir {state} (owned by uid 65534, this is uid 0): run "
                                 "lacd as its owner or set [state] dir to a folder this user can write\n")
    assert list(state.iterdir()) == []


def test_a_state_dir_on_a_read_only_file_system_is_refused_in_one_line(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        state = ro / "state"
        env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl", LACD_STATE_DIR=str(state))
        result = lacd("run", env=env)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"lacd: cannot create the state dir {state}: Read-only file system; set [state] dir "
                                 "to a folder this user can write\n")


# -- the log path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a directory", "a FIFO (named pipe)"])
def test_a_log_path_that_is_not_a_regular_file_is_refused_at_start(tmp_path, kind):
    log = tmp_path / "agent_interactions.jsonl"
    log.mkdir() if kind == "a directory" else os.mkfifo(log)
    env = lacd_env(tmp_path, log)
    for command in ("run", "ingest"):
        result = lacd(command, env=env, timeout=30)  # a FIFO opened for reading would block here
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (f"lacd: the log path {log} is {kind}, not a regular file: set [watch] log to the "
                                 "agent's JSONL file\n")
    if kind != "a directory":  # the agent's writes are not blocked: nobody reads the FIFO, so a writer finds none
        with pytest.raises(OSError):
            os.open(log, os.O_WRONLY | os.O_NONBLOCK)


def test_an_unreadable_log_at_start_is_waited_for_and_shown_in_status(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(lines(1, 2, 3))
    log.chmod(0)
    env = fast_env(tmp_path, log)
    refused = lacd("ingest", env=env, unprivileged=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == f"lacd: cannot read the log {log}: permission denied"  # after the log event
    daemon = Daemon(env, tmp_path, unprivileged=True)
    try:
        waiting = f"daemon      running (pid {daemon.proc.pid}), waiting: cannot read the log {log}: permission denied; " \
                  "it is read once it can be"
        assert wait_until(lambda: daemon_line(env) == waiting), daemon_line(env)
        assert daemon.proc.poll() is None and status(env)["lessons_total"] == 0
        log.chmod(0o600)
        assert wait_until(lambda: status(env)["lessons_total"] == 3)
        assert wait_until(lambda: daemon_line(env) == f"daemon      running (pid {daemon.proc.pid})")
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log.read_text()
    assert len(daemon.events("log_unreadable")) == 1  # said once, not at every poll


def test_an_unreadable_file_put_in_place_by_atomic_replace_is_read_once(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(lines(*range(10)))
    env = fast_env(tmp_path, log)
    daemon = Daemon(env, tmp_path, unprivileged=True)
    try:
        assert wait_until(lambda: status(env)["lessons_total"] == 10)
        replacement = tmp_path / "agent_interactions.jsonl.tmp"
        replacement.write_text(lines(*range(10)) + lines(10))
        replacement.chmod(0)
        os.rename(replacement, log)  # atomic replace by a file lacd cannot read yet
        assert wait_until(lambda: "waiting: cannot read the log" in daemon_line(env))
        assert wait_until(lambda: [s["state"] for s in status(env)["sources"]] == ["done"])  # past rotate_wait
        log.chmod(0o600)
        assert wait_until(lambda: status(env)["lessons_total"] == 11)
        with open(log, "a") as fh:
            fh.write(lines(11))
        assert wait_until(lambda: status(env)["lessons_total"] == 12)
    finally:
        assert daemon.stop() == 0
    rows = json.loads(run_cli("lessons", "--json", "--limit", "100", env=env).stdout)
    assert sorted(r["prompt"] for r in rows) == sorted(f"read the file notes{i}.txt" for i in range(12))  # 18 before
    [source] = status(env)["sources"]
    assert source["state"] == "active" and "lost" not in (source["note"] or "") and "gone" not in (source["note"] or "")


# -- the database ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_damaged_database_is_detected_and_the_fix_given(tmp_path, damage):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(lines(*range(300)))
    env = lacd_env(tmp_path, log)
    assert lacd("ingest", env=env).returncode == 0
    db_path = tmp_path / "state" / "lacd.db"
    with open(db_path, "r+b") as fh:
        if damage == "header":
            fh.write(b"\xde\xad" * 50)  # SQLite no longer knows the file
        else:
            for page in range(3, db_path.stat().st_size // 4096, 3):  # every third page of the tables overwritten
                fh.seek(page * 4096)
                fh.write(b"\xab" * 4096)
    reason = "file is not a database" if damage == "header" else "database disk image is malformed"
    fix = (f"lacd: the database {db_path} is damaged ({reason}): stop lacd, move it aside "
           f"(mv {db_path} {db_path}.damaged, and its -wal and -shm files) and start lacd again: it is rebuilt from "
           "the log, which holds every lesson (runs and model versions are not)\n")
    commands = [("run",), ("ingest",), ("status",)] + ([("lessons",), ("forget", "1", "--yes")] if damage == "header" else [])
    for command in commands:
        result = lacd(*command, env=env)
        assert (result.returncode, result.stderr.splitlines()[-1] + "\n") == (2, fix), command
        assert "Traceback" not in result.stderr
    for path in tmp_path.joinpath("state").glob("lacd.db*"):
        path.rename(f"{path}.damaged")  # the fix, as the message gives it
    assert lacd("ingest", env=env).stdout == "ingested 300 lessons (300 usable, excluded: none), rejected 0 lines\n"


def test_a_database_locked_longer_than_the_busy_timeout_gives_one_line(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(lines(1))
    env = lacd_env(tmp_path, log)
    assert lacd("ingest", env=env).returncode == 0
    db_path = tmp_path / "state" / "lacd.db"
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        short = ("import sys; import lacd.db; lacd.db.BUSY_TIMEOUT_MS = 300; from lacd.cli import main; "
                 "sys.argv = ['lacd', *sys.argv[1:]]; main()")
        for command in (("ingest",), ("forget", "1", "--yes")):
            result = subprocess.run([sys.executable, "-c", short, *command], env=env, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines()[-1] == (f"lacd: the database {db_path} stayed locked by another process "
                                                      "for more than 0.3 s (database is locked)")
            assert "Traceback" not in result.stderr
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status(env)["lessons_total"] == 1 and status(env)["forgotten"] == 0


def test_a_full_disk_backs_off_as_it_says_and_status_shows_it(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=4m,mode=0700") as small:
        log = tmp_path / "agent_interactions.jsonl"
        log.write_text(lines(0))
        env = fast_env(tmp_path, log, LACD_STATE_DIR=str(small / "state"))
        daemon = Daemon(env, tmp_path)
        try:
            assert wait_until(lambda: status(env)["lessons_total"] == 1)
            filler = small / "filler"
            with open(filler, "wb") as fh:  # take every free byte
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            big = "".join(json.dumps({"user_prompt": f"explain file {i}: " + "x" * 20000, "ai_responses": ["ok"]}) + "\n"
                          for i in range(1, 40))
            with open(log, "a") as fh:
                fh.write(big)
            assert wait_until(lambda: daemon.events("ingest_failed"), 30)
            written = 40
            while len(daemon.events("ingest_failed")) < 3:  # the agent goes on writing: each write is a file event
                with open(log, "a") as fh:
                    fh.write(lines(written))
                written += 1
                time.sleep(0.1)
            failing = daemon_line(env)
            assert failing.startswith(f"daemon      running (pid {daemon.proc.pid}), but failing since ")
            assert f": the disk holding {small / 'state' / 'lacd.db'} is full (database or disk is full): free some " \
                   "space; retrying every " in failing
            failed = daemon.events("ingest_failed")[:3]
            assert [e["retry_in"] for e in failed] == [2.0, 4.0, 8.0]
            stamps = [time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S")) for e in failed]
            assert stamps[1] - stamps[0] >= 1 and stamps[2] - stamps[1] >= 3  # waited as long as it said (second resolution)
            filler.unlink()
            assert wait_until(lambda: status(env)["lessons_total"] == written, 30)
            assert wait_until(lambda: daemon_line(env) == f"daemon      running (pid {daemon.proc.pid})")
        finally:
            assert daemon.stop() == 0
        assert "Traceback" not in daemon.log.read_text()


def test_a_log_folder_lacd_cannot_enter_is_waited_for(tmp_path):
    folder = tmp_path / "agent"
    folder.mkdir()
    log = folder / "agent_interactions.jsonl"
    log.write_text(lines(1, 2))
    folder.chmod(0)
    env = fast_env(tmp_path, log)
    daemon = Daemon(env, tmp_path, unprivileged=True)
    try:
        waiting = f"daemon      running (pid {daemon.proc.pid}), waiting: cannot look at the log {log}: permission " \
                  "denied on its directory; it is read once it can be"
        assert wait_until(lambda: daemon_line(env) == waiting), daemon_line(env)
        folder.chmod(0o700)
        assert wait_until(lambda: status(env)["lessons_total"] == 2)
    finally:
        folder.chmod(0o700)
        assert daemon.stop() == 0
    assert len(daemon.events("watcher_unavailable")) <= 1 and len(daemon.events("log_unreadable")) == 1


def test_the_daemon_waits_out_a_locked_database_and_status_shows_it(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(lines(1))
    env = fast_env(tmp_path, log)
    short_busy = ("import sys; import lacd.db; lacd.db.BUSY_TIMEOUT_MS = 300; from lacd.cli import main; "
                  "sys.argv = ['lacd', 'run']; main()")
    out = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-c", short_busy], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: status(env)["lessons_total"] == 1)
        holder = sqlite3.connect(tmp_path / "state" / "lacd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction that does not end
        with open(log, "a") as fh:
            fh.write(lines(2))
        failing = (f": the database {tmp_path / 'state' / 'lacd.db'} stayed locked by another process for more than "
                   "0.3 s (database is locked); retrying every ")
        assert wait_until(lambda: failing in daemon_line(env)), daemon_line(env)
        assert daemon.poll() is None
        holder.execute("ROLLBACK")
        holder.close()
        assert wait_until(lambda: status(env)["lessons_total"] == 2, 30)
        assert wait_until(lambda: daemon_line(env) == f"daemon      running (pid {daemon.pid})")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        out.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
