"""Lane payload encryption (issue 13, ETRM_KAFKA_ENCRYPT_PAYLOADS) on real Tansu + Postgres,
written as the attack it stops: someone who can read the topics (a consumer outside the group,
a broker operator, a backup of the log) sees no prices, positions or contracts — not on the
lanes, not on the reconciliation topic, not in a replay — while the ETRM engine still gets each
record once, in clear. And a holder of the message-signing key (every CLI user had one) cannot
move a sealed value under another message: it does not open, it is dead-lettered."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import samples
from schemas.envelope import header_map
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import produce, read_topic, signed_headers, wait_for

pytestmark = pytest.mark.integration

SECRETS = (b"ENC-", b"REJECT-ENC", b"55.25", b"400", b"Northwind", b"ERCOT", b"position")


def assert_sealed(record: Any) -> None:
    headers = header_map(record.headers)
    assert headers["encryption"].startswith("kid="), headers
    assert headers["encryption"].endswith(",alg=A256GCM")
    for secret in SECRETS:
        assert secret not in record.value, (secret, record.value[:80])
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(record.value)


async def test_a_topic_reader_sees_no_prices_and_the_engine_gets_each_record_once(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(
        sim={"reject_contracts": ["REJECT-*"]}, kafka_encrypt_payloads=True
    )
    desk = pipe.client()
    ops = pipe.operator()
    run = samples.run_id()
    records = [
        samples.otc_confirmation(run, "ENC-0001"),
        samples.otc_confirmation(run, "REJECT-ENC-01"),
    ]
    accepted = await submit_batch(desk, run, records)
    assert accepted.status_code == 202, accepted.text
    final = await pipe.wait_final(desk, accepted.json()["batch_id"])
    assert [m["state"] for m in final["messages"]] == ["delivered", "dead_lettered"]
    ids = {
        contract: m["message_id"]
        for contract, m in zip(["ENC-0001", "REJECT-ENC-01"], final["messages"], strict=True)
    }

    # The engine got the record in clear, once.
    [effect] = [e for e in pipe.sim.effects if e.contract_id == "ENC-0001"]
    assert abs(Decimal(effect.position_mwh)) == 400
    assert effect.settlement_run_id == run
    assert pipe.sim.posts_by_key[ids["ENC-0001"]] == 1

    # A reader of the lane sees neither.
    lane = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_standard, at_least=2
    )
    ours = [r for r in lane if header_map(r.headers).get("message_id") in ids.values()]
    assert len(ours) == 2
    for record in ours:
        assert_sealed(record)

    # The dead letter keeps the copy as it came: sealed on the reconciliation topic too.
    async def dead_letter_published() -> bool:
        found = await read_topic(
            pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, timeout=1
        )
        return any(header_map(r.headers).get("message_id") == ids["REJECT-ENC-01"] for r in found)

    await wait_for(dead_letter_published)
    recon = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_reconciliation, at_least=1
    )
    [dead] = [r for r in recon if header_map(r.headers).get("message_id") == ids["REJECT-ENC-01"]]
    assert_sealed(dead)
    assert header_map(dead.headers)["error.reason"] == "upstream_rejected"

    # A replay puts the record back sealed, and it takes effect once.
    pipe.sim.config.reject_contracts = []
    replay = await ops.post(
        "/v1/reconciliation/replay",
        json={"message_ids": [ids["REJECT-ENC-01"]], "reason": "booked in the engine now"},
    )
    assert replay.status_code == 202, replay.text

    async def replayed() -> bool:
        detail = (await desk.get(f"/v1/settlements/{ids['REJECT-ENC-01']}")).json()
        return bool(detail["state"] == "delivered")

    await wait_for(replayed)
    lane = await read_topic(
        pipe.settings.kafka_bootstrap_servers, pipe.settings.topic_standard, at_least=3
    )
    copies = [r for r in lane if header_map(r.headers).get("message_id") == ids["REJECT-ENC-01"]]
    assert len(copies) == 2
    assert "replay_id" in header_map(copies[-1].headers)
    for record in copies:
        assert_sealed(record)
    assert len([e for e in pipe.sim.effects if e.contract_id == "REJECT-ENC-01"]) == 1

    # The attack: a holder of the signing key (not of the encryption keys) moves the sealed
    # value under another message id and signs it. It does not open: dead-lettered, no effect.
    moved = header_map(ours[0].headers)
    moved = {k: v for k, v in moved.items() if k not in ("signature", "traceparent")}
    moved["message_id"] = "f" * 32
    keys = pipe.settings.signing_keys()
    await produce(
        pipe.settings.kafka_bootstrap_servers,
        pipe.settings.topic_standard,
        [(b"ENC-0001", ours[0].value, signed_headers(ours[0].value, moved, keys))],
    )

    async def refused() -> list[dict[str, Any]]:
        items = (await ops.get("/v1/reconciliation", params={"reason": "invalid_message"})).json()
        return [i for i in items["items"] if i["message_id"] == "f" * 32]

    async def dead_lettered() -> bool:
        return bool(await refused())

    await wait_for(dead_lettered)
    [item] = await refused()
    assert "does not decrypt" in item["last_error"]
    assert pipe.sim.posts_by_key["f" * 32] == 0
    assert len([e for e in pipe.sim.effects if e.contract_id == "ENC-0001"]) == 1
