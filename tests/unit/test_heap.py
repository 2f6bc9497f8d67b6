"""The intake's processes keep the memory big requests' buffers freed (runtime.cpu)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One big request's worth of buffers, as a driver grows one by doubling, touched page by page;
# then the minor page faults per request, once the first request has set the heap up.
_REQUESTS = """
import resource, sys
sys.path.insert(0, {root!r})
if {retain}:
    from runtime.cpu import retain_freed_memory
    assert retain_freed_memory()

def request():
    parts = []
    for size in (600_000, 1_200_000, 2_400_000, 4_800_000):
        buffer = bytearray(size)
        buffer[::4096] = b"x" * len(buffer[::4096])
        parts.append(buffer)
    return bytes(parts[-1])

request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    request()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def _faults_per_request(retain: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _REQUESTS.format(root=str(ROOT), retain=retain)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_big_requests_buffers_do_not_fault_in_fresh_pages_each_time() -> None:
    """With glibc's defaults every request faulted its megabytes in anew (about 3,300 faults
    for these 9 MB); kept, the next request reuses them."""
    default = _faults_per_request(retain=False)
    kept = _faults_per_request(retain=True)
    assert default > 1000, default  # what the defaults cost (the test shows the difference)
    assert kept < default / 10, (kept, default)
