"""``pyrovae fit --nproc N``: N processes on this machine that train as one data-parallel run.

Each process is ``python -m pyrovae fit ...`` with the environment `torchrun` gives its workers
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a run started either way is the
same run. Why not call `torchrun` itself: when one worker fails it stops the others, as we do,
but reports it in a page of tracebacks from every process; here rank 0 prints as a single
process would, and a failure elsewhere is one line (which rank, its status, its last line).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO

__all__ = ["launch"]

RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")
ERROR_LINE = re.compile(r"^(pyrovae: error: |[\w.]*(Error|Exception)\b)")  # what a failure's report quotes (Pyro appends trace shapes after it)
ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _read(stream: IO[str], lines: deque[str], relay: bool) -> None:
    """Keep a rank's last stderr lines; rank 0's are passed on as they come (`relay`) until an
    error report or a traceback starts, which the launcher reports in one line instead."""
    for line in stream:
        line = RANK_PREFIX.sub("", line)  # torch.distributed marks a rank's traceback lines "[rank0]: "
        if line.startswith(("pyrovae: error:", "pyrovae: interrupted", "Traceback")):
            relay = False
        if relay:
            sys.stderr.write(line)
            sys.stderr.flush()
        if line.strip():
            lines.append(line.rstrip())


def _cause(failed: list[int], codes: list[int | None], tails: list[deque[str]]) -> int:
    """The rank whose failure to report: a clean refusal (status 2) before a crash, a crash
    before a rank that lost its peer (gloo's "Connection closed by peer"), then the lowest rank."""
    lost = lambda rank: any("closed by peer" in line or "Connection reset" in line for line in tails[rank])  # noqa: E731
    return min(failed, key=lambda rank: (lost(rank), codes[rank] != 2, rank))


def launch(argv: Sequence[str], nproc: int, threads: int = 1) -> int:
    """Run ``python -m pyrovae *argv`` as `nproc` ranks; return 0 when all succeed, else the
    status of the failure reported (2 for a refused input, 1 otherwise), after stopping the others."""
    port = _free_port()
    procs, tails, readers = [], [], []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        lines: deque[str] = deque(maxlen=100)
        # rank 0 speaks for the run on stdout; every rank's stderr is read, for a one-line failure report
        proc = subprocess.Popen([sys.executable, "-m", "pyrovae", *argv], env=env, stdout=None if rank == 0 else subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=_read, args=(proc.stderr, lines, rank == 0), daemon=True)
        reader.start()
        procs.append(proc)
        tails.append(lines)
        readers.append(reader)
    interrupted = False
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:
            p.send_signal(signal.SIGINT)
    codes = [p.poll() for p in procs]
    failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p, reader in zip(procs, readers):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        reader.join(timeout=5)
    if interrupted:
        print("pyrovae: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    if not failed:
        return 0
    rank = _cause(failed, codes, tails)
    code = codes[rank]
    assert code is not None
    last = next((line for line in reversed(tails[rank]) if ERROR_LINE.match(line)), tails[rank][-1] if tails[rank] else "(no message)")
    if code == 2 and last.startswith("pyrovae: error: "):  # refused input: the line one process would print
        print(last if rank == 0 else f"{last} (rank {rank} of {nproc}; the other ranks were stopped)", file=sys.stderr)
    else:
        status = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        print(f"pyrovae: error: rank {rank} of {nproc} failed ({status}): {last.removeprefix('pyrovae: error: ')}; "
              "the other ranks were stopped", file=sys.stderr)
    return 2 if code == 2 else 1
