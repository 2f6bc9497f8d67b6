"""Imported by the worker processes of tests/unit/test_cpu_preload.py: each that imports it
writes its pid to the file named by ETRM_TEST_PRELOAD_PROBE."""

import os
from pathlib import Path

_OUT = os.environ.get("ETRM_TEST_PRELOAD_PROBE")
if _OUT:
    with Path(_OUT).open("a") as out:
        out.write(f"{os.getpid()}\n")
