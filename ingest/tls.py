"""Mutual TLS at the intake: who is on the other end of the connection.

Uvicorn verifies the client certificate during the handshake (ssl_cert_reqs=CERT_REQUIRED with
ETRM_TLS_CLIENT_CA) but does not hand it to the application. This protocol class is uvicorn's
own HTTP/1.1 protocol plus one step: once the handshake is done it puts the verified peer
certificate into every request's scope, as the ASGI TLS extension does
(`scope["extensions"]["tls"]`), so a certificate-bound token (RFC 8705, `cnf.x5t#S256`) can be
checked against the certificate actually presented on this connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def thumbprint(der: bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url, unpadded, of the certificate's SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


class ClientCertProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        tls = {
            "client_cert_der": der,
            "client_cert_thumbprint": thumbprint(der),
            "tls_version": ssl_object.version(),
        }
        inner = self.app

        async def with_peer_certificate(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = tls
            await inner(scope, receive, send)

        self.app = with_peer_certificate


def presented_thumbprint(scope: MutableMapping[str, Any]) -> str | None:
    tls = scope.get("extensions", {}).get("tls") or {}
    value = tls.get("client_cert_thumbprint")
    return value if isinstance(value, str) else None
