"""The desk examples work against the running system: the typed client retries a rate-limited
batch with the same Idempotency-Key, then follows it to its outcomes; the curl calls in
examples/curl.md are the requests the API accepts."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import samples
from tests.conftest import Pipeline, PipelineFactory

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

from settlement_client import Refused, SettlementClient  # noqa: E402


async def test_client_retries_a_rate_limited_batch_with_one_key_and_reads_outcomes(
    pipeline_factory: PipelineFactory,
) -> None:
    # One request a second, no burst: the client's second batch meets a 429 with Retry-After.
    pipe: Pipeline = await pipeline_factory(
        desk_rate_limit="1:1", sim={"reject_contracts": ["REJECT-*"]}
    )
    token = pipe.token()
    run = samples.run_id()
    async with SettlementClient(pipe.intake.url, token, rng=random.Random(7)) as client:
        first = await client.submit([samples.otc_confirmation(run, "EXAMPLE-001")])
        second = await client.submit(
            [samples.otc_confirmation(run, "EXAMPLE-002"), samples.iso_award(run, "REJECT-0001")]
        )
        assert first.attempts == 1
        assert second.attempts >= 2  # the 429 was retried …
        outcome = await client.wait_final(second.batch_id)
        # … with the same key: the same request again is the same batch, nothing queued twice.
        again = await client.submit(
            [samples.otc_confirmation(run, "EXAMPLE-002"), samples.iso_award(run, "REJECT-0001")],
            idempotency_key=second.idempotency_key,
        )
        assert again.batch_id == second.batch_id
        assert again.earlier
        assert again.message_ids == second.message_ids
        assert [m["state"] for m in outcome.messages] == ["delivered", "dead_lettered"]
        with pytest.raises(Refused) as refused:
            await client.submit([{**samples.otc_confirmation(run, "EXAMPLE-003"), "side": "up"}])
        assert refused.value.status == 422
        assert refused.value.problem["errors"][0]["index"] == 0
    assert sorted(e.contract_id for e in pipe.sim.effects) == sorted(
        {e.contract_id for e in pipe.sim.effects}
    )
    assert len(pipe.sim.effects) == 2


def test_curl_examples_parse_and_name_real_routes() -> None:
    text = (EXAMPLES / "curl.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    calls = [b for b in blocks if b.lstrip().startswith("curl")]
    assert len(calls) >= 4
    for call in calls:
        words = shlex.split(call.replace("\\\n", " "))
        assert words[0] == "curl"
        url = next(w for w in words if w.startswith("$URL/"))
        assert re.fullmatch(
            r"\$URL/v1/(settlements/sync|settlements/batches|batches/<batch_id>|"
            r"settlements/<message_id>)",
            url,
        ), url


def test_client_example_shows_its_usage() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "settlement_client.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "--token" in done.stdout
