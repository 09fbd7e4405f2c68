"""Processes started and stopped by id: free loopback ports, a started process in its own session with its log,
and the processes it started (each checked against its start time, so a reused pid is never signalled).
Used by :mod:`.rehearsal`; nothing here ever stops a process it did not start (unlike ``ray stop``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

LOOPBACK = "127.0.0.1"


class RehearsalError(RuntimeError):
    """A rehearsal process did not come up; the message names it and the tail of its log."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    """True if something accepts connections on loopback ``port``."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


def proc_stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time) of a live process, from /proc; None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Live descendants of ``root``: pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def alive(procs: dict[int, int]) -> list[int]:
    """The pids of ``procs`` (pid -> start time) still running as the same process."""
    return [pid for pid, start in procs.items() if (st := proc_stat(pid)) is not None and st[1] == start]


def kill_all(procs: dict[int, int]) -> list[int]:
    """SIGKILL each process of ``procs`` still alive (same start time); returns the pids signalled."""
    left = alive(procs)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@dataclass
class Service:
    """One started process (in its own session), its log and what it started."""
    name: str
    proc: subprocess.Popen
    log: Path
    ports: list[int] = field(default_factory=list)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def fail(self, why: str) -> RehearsalError:
        return RehearsalError(f"{self.name}: {why} (log: {self.log})\n{self.log_tail()}")

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail fast if the process exits, or after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with code {self.proc.returncode} before {what}")
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise self.fail(f"no {what} after {timeout:.0f} s")

    def stop(self, grace: float = 30, hard: bool = False) -> list[int]:
        """SIGTERM (or, ``hard``, SIGKILL to the whole process group at once, like a machine that vanishes),
        then SIGKILL to whatever it started that is still alive. Returns the pids that had to be killed."""
        procs = descendants(self.proc.pid)
        if hard:
            procs[self.proc.pid] = proc_stat(self.proc.pid)[1] if proc_stat(self.proc.pid) else 0
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            killed = kill_all(procs)
            self.proc.wait(timeout=30)
            return killed
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and alive(procs):
            time.sleep(0.5)
        return kill_all(procs)


def start(name: str, cmd: list[str], env: dict, log: Path, cwd: Optional[Path] = None,
           ports: Optional[list[int]] = None) -> Service:
    """Start ``cmd`` in its own session, output to ``log``."""
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=cwd)
    return Service(name, proc, log, ports or [])


def http_ok(url: str, token: Optional[str] = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def tool(name: str) -> str:
    """A command installed next to this Python (the virtual environment's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise RehearsalError(f"`{name}` not found next to {sys.executable} or on PATH; install the test extra: "
                             "pip install -e '.[test]'")
    return found
