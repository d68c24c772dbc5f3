"""Memory of a process tree while a benchmark runs it (bench_scale's pieces, bench_vs_upstream's systems)."""

from __future__ import annotations

import threading
from pathlib import Path


def status_bytes(key: str, pid: int | str = "self") -> int:
    """A size field of /proc/<pid>/status (VmRSS, VmHWM, RssAnon...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


class TreeMemory:
    """Samples the RSS of a process and all its descendants in a thread until `stop`: the peak of
    their sum, and each process title's peak RSS and anonymous RSS (Ray actors are titled after their
    class, e.g. `ray::LearnerRank.train_step`; the root is "main")."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.root, self.every_s, self._stop = psutil.Process(pid), every_s, threading.Event()
        self.peak_total = 0
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    title = " ".join(process.cmdline()).split(" ")[0].split(".")[0] if process != self.root else "main"
                    rss, anon = process.memory_info().rss, status_bytes("RssAnon", process.pid)
                except (psutil.Error, FileNotFoundError, RuntimeError):
                    continue  # exited between the listing and the read
                total += rss
                self.peaks[title] = max(self.peaks.get(title, 0), rss)
                self.anon_peaks[title] = max(self.anon_peaks.get(title, 0), anon)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.every_s)

    def stop(self) -> TreeMemory:
        self._stop.set()
        self._thread.join(timeout=5)
        return self
