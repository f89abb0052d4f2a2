"""`--workers N`: the token pre-count's tables are loaded once, before the fork, and shared.

Measured in a child process that forks like serve.py's workers: what a worker's first token count
adds to its private memory (/proc smaps_rollup), with and without `share_tokenizers()` first.
Without it each worker builds its own o200k_base tables (~79 MB of RSS); with it they are the
parent's pages, shared copy-on-write."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import os, re, sys
from proxy.core.encodings import encoding
from proxy.server.serve import share_tokenizers

def private_mb():
    text = open("/proc/self/smaps_rollup").read()
    return sum(int(v) for v in re.findall(r"^Private_(?:Clean|Dirty):\\s+(\\d+) kB", text, re.M)) / 1024

if sys.argv[1] == "shared":
    share_tokenizers()
read, write = os.pipe()
if os.fork() == 0:  # a worker: its first count
    try:
        before = private_mb()
        tokens = len(encoding("o200k_base").encode("hello world " * 100))
        os.write(write, f"{private_mb() - before:.1f} {tokens}".encode())
    finally:
        os._exit(0)
os.close(write)
os.wait()
print(os.read(read, 100).decode())
"""


def worker_growth_mb(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", WORKER, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    grown, tokens = done.stdout.split()
    assert int(tokens) > 100  # the worker really counted
    return float(grown)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc only")
def test_a_worker_counts_with_the_parents_tables():
    own = worker_growth_mb("own")
    shared = worker_growth_mb("shared")
    assert own > 50, own  # the worker built o200k_base itself
    assert shared < 10, shared  # it used the parent's pages
