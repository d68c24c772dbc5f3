"""bench/tree_memory.py: the benchmarks' memory of a whole process tree."""

from __future__ import annotations

import subprocess
import sys

from bench.tree_memory import TreeMemory

HOLD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(2)"])
x = bytearray(100 * 2**20)
child.wait()
"""


def test_the_peak_counts_the_children_and_each_title_keeps_its_own():
    process = subprocess.Popen([sys.executable, "-c", HOLD])
    memory = TreeMemory(process.pid, every_s=0.05)
    process.wait()
    memory.stop()
    mib = 2**20
    assert memory.peak_total > 300 * mib  # the root's 100 MiB and the grandchild's 200 MiB at once
    assert memory.anon_peaks["main"] > 100 * mib and memory.peaks["main"] < 200 * mib
    assert max(memory.anon_peaks.values()) > 200 * mib  # the grandchild, under its interpreter's title
