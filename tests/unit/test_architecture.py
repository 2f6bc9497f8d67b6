"""The layers of issue #7 hold: schemas <- ledger, runtime <- operations <- ingest, workers <- ops;
the decision core imports no I/O library; nothing in the product imports the dev tooling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


PRODUCT = ("schemas", "ledger", "runtime", "operations", "ingest", "workers", "ops")


def test_no_product_code_waits_with_asyncio_wait_for() -> None:
    """Before Python 3.12, `asyncio.wait_for` returns its inner result and drops the caller's
    cancellation when both arrive in the same instant: a stopping worker's committer went on
    committing that way (a6495dd). Waits with a bound use `asyncio.timeout`, which never
    swallows a cancellation (tests/unit/test_building_blocks.py shows one such wait)."""
    import ast

    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
