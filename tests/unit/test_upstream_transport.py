"""The upstream client on its real transport against an upstream that misbehaves on the wire:
every answer ends as an `Answer` (or TokenUnavailable) within the deadline, never an exception
that would cost the delivery step, and never a body read past BODY_LIMIT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from workers.rules import BODY_LIMIT, AnswerKind
from workers.upstream import HttpPool, TokenProvider, TokenUnavailable, UpstreamClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
DEADLINE_S = 1.0


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)


async def _serve(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[UpstreamClient]]]:
    servers: list[asyncio.Server] = []
    pools: list[HttpPool] = []

    async def start(handler: Handler) -> UpstreamClient:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        http = HttpPool(4, DEADLINE_S)
        pools.append(http)
        url = f"http://127.0.0.1:{port}"
        tokens = TokenProvider(http, url + "/oauth/token", "c", "s")
        return UpstreamClient(http, tokens, base_url=url, signing_secret="sig")

    yield start
    for http in pools:
        await http.aclose()
    for server in servers:
        server.close()


async def _drip(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n")
    for _ in range(100):
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.2)  # each read well inside the transport's read timeout


async def _garbage(writer: asyncio.StreamWriter) -> None:
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()


async def _huge_header(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 201 Created\r\nX-Junk: " + b"a" * 200_000 + b"\r\n\r\n")
    await writer.drain()


async def _closed(writer: asyncio.StreamWriter) -> None:
    return None


async def _cut_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 1000\r\n\r\n{")
    await writer.drain()


@pytest.mark.parametrize(
    "answer", [_drip, _garbage, _huge_header, _closed, _cut_body], ids=lambda f: f.__name__
)
async def test_a_misbehaving_upstream_is_a_failed_attempt_within_the_deadline(
    upstream: Callable[[Handler], Awaitable[UpstreamClient]],
    answer: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> None:
    client = await upstream(await _serve(answer))
    started = time.monotonic()
    got = await client.post(b'{"contract_id":"C"}', "m-1", "trace", "token")
    assert got.kind is AnswerKind.TRANSIENT
    assert time.monotonic() - started < DEADLINE_S + 2.0  # the drip alone would take 20 s


async def test_a_huge_answer_is_read_only_up_to_the_limit(
    upstream: Callable[[Handler], Awaitable[UpstreamClient]],
) -> None:
    sent = 0

    async def flood(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        size = 2**30
        writer.write(f"HTTP/1.1 201 Created\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"x" * 65536
        while sent < size:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    client = await upstream(await _serve(flood))
    got = await client.post(b'{"contract_id":"C"}', "m-1", "trace", "token")
    # Any 2xx: the upstream has it — answered well inside the deadline, so the client did not
    # go on reading the gigabyte (sent: what the socket buffers took before it stopped).
    assert got.kind is AnswerKind.TAKEN
    assert BODY_LIMIT < sent < 2**30


async def test_a_garbled_token_endpoint_is_token_unavailable(
    upstream: Callable[[Handler], Awaitable[UpstreamClient]],
) -> None:
    for answer in (_garbage, _drip, _closed):
        client = await upstream(await _serve(answer))
        with pytest.raises(TokenUnavailable):
            await client.token()


async def test_the_post_carries_the_contracts_headers_and_asks_for_an_uncompressed_answer(
    upstream: Callable[[Handler], Awaitable[UpstreamClient]],
) -> None:
    """The answer is read as raw bytes (bounded), so it must not come compressed: httpx's
    default `Accept-Encoding: gzip, deflate` would let an upstream gzip it, unread."""
    seen: list[bytes] = []
    body = b'{"contract_id":"C"}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        await reader.readexactly(len(body))
        answer = b'{"transaction_id":"T-1","reconciled_position_mwh":"10.000"}'
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(answer)}\r\n\r\n".encode()
            + answer
        )
        await writer.drain()
        writer.close()

    client = await upstream(handle)
    got = await client.post(body, "m-1", "trace-1", "tok")
    assert got.kind is AnswerKind.TAKEN
    assert got.transaction_id == "T-1"
    [head] = seen
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/settlements/sync HTTP/1.1"
    pairs = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    ]
    headers = dict(pairs)
    assert len(headers) == len(pairs), f"a header sent twice: {pairs}"
    assert headers["host"].startswith("127.0.0.1:")
    assert headers["accept-encoding"] == "identity"
    assert headers["authorization"] == "Bearer tok"
    assert headers["idempotency-key"] == "m-1"
    assert headers["x-gateway-trace-id"] == "trace-1"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    assert headers["x-signature"].startswith("t=")
