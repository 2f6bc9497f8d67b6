"""Payloads at rest and the audit trail on real Postgres (issue 3): no plaintext in the
payload columns, key rotation keeps everything readable, the chain verifies, tampering by a
superuser is found at the row it happened, and the database refuses to change audit rows."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ledger import audit
from ledger.crypto import PayloadCipher
from ledger.db import make_engine
from ledger.keys import rotate
from ledger.rows import Actor
from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch
from tests.support import run_cli

pytestmark = pytest.mark.integration


async def deliver_some(pipe: Pipeline, *contracts: str) -> list[str]:
    client = pipe.client()
    run = samples.run_id()
    batch = await submit_batch(client, run, [samples.otc_confirmation(run, c) for c in contracts])
    final = await pipe.wait_final(client, batch.json()["batch_id"])
    return [m["message_id"] for m in final["messages"]]


async def test_payloads_are_encrypted_and_rotation_keeps_them_readable(
    pipeline_factory: PipelineFactory,
) -> None:
    pipe: Pipeline = await pipeline_factory(sim={"reject_contracts": ["REJECT-*"]})
    ids = await deliver_some(pipe, "OTC-ENC-0001", "REJECT-ENC-01")
    engine = make_engine(pipe.settings.database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT message_id, payload, payload_kid FROM messages "
                        "WHERE message_id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
            ).all()
            dead = (
                await conn.execute(
                    text(
                        "SELECT dead_letter_id, kafka_value, value_kid FROM dead_letters "
                        "WHERE message_id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
            ).all()
        assert len(rows) == 2
        assert len(dead) == 1
        for _, sealed, kid in [*rows, *dead]:
            assert kid == "e1"
            assert b"OTC-ENC" not in sealed
            assert b"REJECT-ENC" not in sealed
            assert b"settlement_run_id" not in sealed

        old = base64.b64decode(pipe.infra.encryption_key)
        new = secrets.token_bytes(32)
        both = PayloadCipher([("e2", new), ("e1", old)])
        counts = await rotate(engine, both, Actor("operator", "op-keys", "ops"))
        assert counts["messages"] >= 2
        assert counts["dead_letters"] >= 1
        only_new = PayloadCipher([("e2", new)])
        async with engine.connect() as conn:
            remaining = await conn.scalar(
                text("SELECT count(*) FROM messages WHERE payload_kid <> 'e2'")
            )
            rows = (
                await conn.execute(text("SELECT message_id, payload, payload_kid FROM messages"))
            ).all()
        assert remaining == 0
        for message_id, sealed, kid in rows:
            record = json.loads(only_new.open(kid, sealed, message_id))
            assert "contract_id" in record
    finally:
        await engine.dispose()


async def test_audit_chain_verifies_and_names_the_tampered_row(pipeline: Pipeline) -> None:
    ids = await deliver_some(pipeline, "OTC-AUD-0001", "OTC-AUD-0002")
    engine = make_engine(pipeline.settings.database_url)
    try:
        await audit.sequence_all(engine)
        result = await audit.verify(engine)
        assert result.ok, result
        assert result.rows >= 5
        async with engine.connect() as conn:
            trail = (
                await conn.execute(
                    text(
                        "SELECT seq, action, actor_kind, desk, token_id, source_address, detail "
                        "FROM audit_log WHERE message_id = :id OR batch_id = "
                        "(SELECT batch_id FROM messages WHERE message_id = :id) ORDER BY seq"
                    ),
                    {"id": ids[0]},
                )
            ).all()
        assert [r.action for r in trail] == [
            "batch.accepted",
            "message.delivering",
            "message.delivered",
        ]
        queued = trail[0]
        assert queued.actor_kind == "trader"
        assert queued.desk == "power-east"
        assert queued.token_id
        assert queued.source_address == "127.0.0.1"

        target = trail[1].seq
        for statement in (
            "UPDATE audit_log SET detail = 'x' WHERE seq = :s",
            "UPDATE audit_log SET hash = NULL, seq = NULL WHERE seq = :s",
            "DELETE FROM audit_log WHERE seq = :s",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement), {"s": target} if ":s" in statement else {})

        # A superuser who disables the trigger can change a row — and is found out.
        async with engine.begin() as conn:
            original = await conn.scalar(
                text("SELECT detail FROM audit_log WHERE seq = :s"), {"s": target}
            )
            await conn.execute(
                text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_sequence_once")
            )
            await conn.execute(
                text("UPDATE audit_log SET detail = 'nothing to see' WHERE seq = :s"), {"s": target}
            )
            await conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_sequence_once"))
        try:
            tampered = await audit.verify(engine)
            assert not tampered.ok
            assert tampered.first_bad_seq == target
            cli = await run_cli(pipeline.env, "audit", "verify", "--json")
            assert cli.code == 1
            assert json.loads(cli.stdout)["first_bad_seq"] == target
        finally:
            async with engine.begin() as conn:
                await conn.execute(
                    text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_sequence_once")
                )
                await conn.execute(
                    text("UPDATE audit_log SET detail = :d WHERE seq = :s"),
                    {"d": original, "s": target},
                )
                await conn.execute(
                    text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_sequence_once")
                )
        assert (await audit.verify(engine)).ok
    finally:
        await engine.dispose()


async def test_signed_checkpoints(pipeline: Pipeline) -> None:
    await deliver_some(pipeline, "OTC-CKP-0001")
    engine = make_engine(pipeline.settings.database_url)
    signer = Ed25519PrivateKey.generate()
    try:
        await audit.sequence_all(engine)
        seq = await audit.write_checkpoint(engine, signer)
        assert seq is not None
        count, problems = await audit.verify_checkpoints(engine, signer.public_key())
        assert count >= 1
        assert problems == []
        impostor = Ed25519PrivateKey.generate().public_key()
        _, forged = await audit.verify_checkpoints(engine, impostor)
        assert any(f"checkpoint {seq}" in p for p in forged)
    finally:
        async with engine.begin() as conn:  # leave no checkpoint signed by a throwaway key
            await conn.execute(text("DELETE FROM audit_checkpoints"))
        await engine.dispose()


TRIGGER = "audit_log_sequence_once"


async def test_a_superuser_rewrite_is_caught_by_the_checkpoints_kept_outside_the_database(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The attack of issue #13: a database superuser deletes the signed checkpoints, edits a
    row and recomputes the whole chain. The chain alone then verifies; the checkpoint kept
    outside the database, and the rule that old rows must be covered by one, do not."""
    await deliver_some(pipeline, "OTC-DBA-00001")
    await pipeline.stop_worker()  # nothing appends to the trail while it is rewritten
    engine = make_engine(pipeline.settings.database_url)
    signer = Ed25519PrivateKey.generate()
    public = signer.public_key()
    try:
        await audit.sequence_all(engine)
        seq = await audit.write_checkpoint(engine, signer, tmp_path)
        assert seq is not None
        honest = await audit.verify_checkpoints(
            engine, public, max_age_s=3600, external_dir=tmp_path
        )
        assert honest == (1, [])

        async with engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": audit._SEQUENCER_LOCK}
            )
            await conn.execute(
                text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_sequence_once")
            )
            await conn.execute(text("DELETE FROM audit_checkpoints"))
            await conn.execute(text("UPDATE audit_log SET detail = 'rewritten' WHERE seq = 1"))
            rows = await conn.execute(
                text("SELECT * FROM audit_log WHERE seq IS NOT NULL ORDER BY seq")
            )
            prev = audit.GENESIS
            for row in [dict(r._mapping) for r in rows]:
                row["prev_hash"] = prev
                prev = audit.row_hash(row)
                await conn.execute(
                    text("UPDATE audit_log SET prev_hash = :p, hash = :h WHERE seq = :s"),
                    {"p": row["prev_hash"], "h": prev, "s": row["seq"]},
                )
            await conn.execute(text(f"ALTER TABLE audit_log ENABLE TRIGGER {TRIGGER}"))

        assert (await audit.verify(engine)).ok  # the chain alone is fooled
        _, problems = await audit.verify_checkpoints(
            engine, public, max_age_s=0.0, external_dir=tmp_path
        )
        assert f"external checkpoint {seq}: chain row {seq} no longer has that hash" in problems
        assert any("no signed checkpoint covers them" in p for p in problems)

        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        cli = await run_cli(
            {
                **pipeline.env,
                "ETRM_AUDIT_VERIFY_KEY": base64.b64encode(raw).decode(),
                "ETRM_AUDIT_CHECKPOINT_DIR": str(tmp_path),
            },
            "audit",
            "verify",
            "--json",
        )
        assert cli.code == 1, cli.stderr
        found = json.loads(cli.stdout)
        assert any(f"external checkpoint {seq}" in p for p in found["checkpoint_problems"])
    finally:
        await engine.dispose()
