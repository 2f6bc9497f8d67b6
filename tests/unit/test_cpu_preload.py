"""The intake's worker processes import the code a big batch runs as they start
(runtime.cpu.use_processes' preload), not on the first batch they are given: a fresh intake's
first 1,000-record batch took 388 ms against 70-96 ms for the next ones, most of it that import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from runtime import cpu
    cpu.use_processes(2, preload=tuple(sys.argv[1:]))
    cpu.warm_processes()
    deadline = time.monotonic() + 60
    while len(cpu.process_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # any import a process makes at start is done by now
    print(" ".join(str(pid) for pid in sorted(cpu.process_ids())), flush=True)
    """
)


def _imported_by(tmp_path: Path, *preload: str) -> tuple[set[int], set[int]]:
    """(the worker processes' pids, the pids that imported the probe), no work given."""
    probe = tmp_path / "probe.txt"
    probe.touch()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *preload],
        env={**os.environ, "ETRM_TEST_PRELOAD_PROBE": str(probe)},
        cwd=os.getcwd(),
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    processes = {int(pid) for pid in done.stdout.split()}
    return processes, {int(line) for line in probe.read_text().split()}


def test_each_worker_process_imports_the_preloaded_code_as_it_starts(tmp_path: Path) -> None:
    processes, imported = _imported_by(tmp_path, "tests.preload_probe")
    assert len(processes) == 2
    assert imported == processes


def test_without_a_preload_nothing_is_imported_before_work(tmp_path: Path) -> None:
    processes, imported = _imported_by(tmp_path)
    assert len(processes) == 2
    assert imported == set()


def test_the_intake_preloads_the_code_that_prepares_a_batch() -> None:
    from ingest.preparing import prepare_batch_body
    from ops.bootstrap import BATCH_CODE

    assert prepare_batch_body.__module__ in BATCH_CODE
