"""Fault drills: kill a run's workers on purpose, at a moment they hold work (tests, bench).

Ray titles each actor process after its class and the method it is running: the rollout worker is
`ray::ARRolloutWorker.generate` while it samples and `ray::ARRolloutWorker` when idle. A drill looks
for those titles among the processes below a driver (a local cluster runs below the driver that
started it) and, when one is busy, SIGKILLs it (a crash, not a polite exit) or SIGSTOPs it (a hang:
the process is there and answers nothing).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

import psutil

ROLES = {
    # role: (title of the process, title while it works)
    "rollout": ("ray::ARRolloutWorker", "ray::ARRolloutWorker.generate"),
    "decoder": ("ray::DiffusionDecoderWorker", "ray::DiffusionDecoderWorker.decode"),
    "reward": ("ray::ServeReplica:rewards", "ray::ServeReplica:rewards:rewards.handle_request"),
}


@dataclass(frozen=True)
class InjectedFault:
    role: str
    kind: str
    pid: int
    title: str
    """Its title when it was killed (shows what it was doing)."""


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def worker_processes(root_pid: int, role: str) -> list[psutil.Process]:
    """Live processes of `role` below `root_pid`."""
    title, _ = ROLES[role]
    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in below if _title(p).startswith(title)]


def inject_fault(root_pid: int, role: str, kind: Literal["kill", "hang"] = "kill", timeout_s: float = 300.0,
                 poll_s: float = 0.01) -> InjectedFault:
    """Kill or hang the first `role` process seen working; TimeoutError if none was within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in worker_processes(root_pid, role):
            title = _title(process)
            if title.startswith(ROLES[role][1]):
                os.kill(process.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                return InjectedFault(role, kind, process.pid, title)
        time.sleep(poll_s)
    raise TimeoutError(f"no busy '{role}' worker below pid {root_pid} within {timeout_s:.0f} s")
