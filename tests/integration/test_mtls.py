"""Mutual TLS at the intake over real TLS connections, with certificates made here (issue 3):
no certificate, another CA's, an expired one are refused at the handshake; a certificate-bound
token (RFC 8705) works only with its own certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest.tls import ClientCertProtocol, thumbprint
from schemas import samples
from tests.conftest import Pipeline, PipelineFactory

pytestmark = pytest.mark.integration
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def issue(
    directory: Path,
    name: str,
    *,
    issuer: Issued | None = None,
    ca: bool = False,
    server: bool = False,
    not_after: dt.datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(not_after or NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    if not ca:
        usage = (
            x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
            if server
            else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, key, cert_path, key_path)


@dataclass
class Pki:
    ca: Issued
    server: Issued
    alice: Issued
    bob: Issued
    stranger: Issued
    expired: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = issue(tmp_path, "desks-ca", ca=True)
    other_ca = issue(tmp_path, "other-ca", ca=True)
    return Pki(
        ca=ca,
        server=issue(tmp_path, "intake", issuer=ca, server=True),
        alice=issue(tmp_path, "alice", issuer=ca),
        bob=issue(tmp_path, "bob", issuer=ca),
        stranger=issue(tmp_path, "stranger", issuer=other_ca),
        expired=issue(tmp_path, "expired", issuer=ca, not_after=NOW - dt.timedelta(days=1)),
    )


@pytest.fixture
async def tls_pipeline(pipeline_factory: PipelineFactory, pki: Pki) -> Pipeline:
    pipe: Pipeline = await pipeline_factory(
        worker=False,
        tls_client_ca=str(pki.ca.cert_path),
        intake_config={
            "ssl_certfile": str(pki.server.cert_path),
            "ssl_keyfile": str(pki.server.key_path),
            "ssl_ca_certs": str(pki.ca.cert_path),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "http": ClientCertProtocol,
        },
    )
    return pipe


def client_for(pipe: Pipeline, pki: Pki, identity: Issued | None) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if identity is not None:
        context.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    client = httpx.AsyncClient(base_url=pipe.intake.url, verify=context, timeout=10)
    pipe.clients.append(client)
    return client


async def submit(client: httpx.AsyncClient, token: str) -> httpx.Response:
    run = samples.run_id()
    return await client.post(
        "/v1/settlements/sync",
        json=samples.otc_confirmation(run, "OTC-MTLS-001"),
        headers={"Authorization": f"Bearer {token}", "X-Settlement-Run-ID": run},
    )


@pytest.mark.parametrize("who", ["none", "stranger", "expired"])
async def test_handshake_refused_without_a_valid_client_certificate(
    tls_pipeline: Pipeline, pki: Pki, who: str
) -> None:
    identity = {"none": None, "stranger": pki.stranger, "expired": pki.expired}[who]
    client = client_for(tls_pipeline, pki, identity)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        await submit(client, tls_pipeline.token())


async def test_certificate_bound_token(tls_pipeline: Pipeline, pki: Pki) -> None:
    bound_to_alice = tls_pipeline.token(
        extra_claims={"cnf": {"x5t#S256": thumbprint(pki.alice.der)}}
    )
    as_alice = client_for(tls_pipeline, pki, pki.alice)
    as_bob = client_for(tls_pipeline, pki, pki.bob)
    wrong = await submit(as_bob, bound_to_alice)
    assert wrong.status_code == 401
    right = await submit(as_alice, bound_to_alice)
    assert right.status_code == 202, right.text
    # An unbound token still works over a verified mutual-TLS connection.
    assert (await as_bob.get("/healthz")).status_code == 200


async def test_the_peer_certificate_reaches_the_app_on_uvloop_too(pki: Pki) -> None:
    """`etrm-sync intake` runs on uvloop (uvicorn picks it when installed); the protocol that
    hands the verified certificate to the app must work on that loop's TLS transport too."""
    import threading

    import uvicorn

    from ingest.tls import presented_thumbprint
    from ops.dev.stack import free_port

    loops: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        loops.append(type(asyncio.get_running_loop()).__module__)
        body = (presented_thumbprint(scope) or "none").encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http=ClientCertProtocol,
            lifespan="off",
            log_level="warning",
            ssl_certfile=str(pki.server.cert_path),
            ssl_keyfile=str(pki.server.key_path),
            ssl_ca_certs=str(pki.ca.cert_path),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
        context.load_cert_chain(str(pki.alice.cert_path), str(pki.alice.key_path))
        async with httpx.AsyncClient(verify=context, timeout=5) as client:
            for _ in range(100):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            answer = await client.get(f"https://127.0.0.1:{port}/")
        assert answer.text == thumbprint(pki.alice.der)
        assert loops[0].startswith("uvloop")
    finally:
        server.should_exit = True
        thread.join(10)
