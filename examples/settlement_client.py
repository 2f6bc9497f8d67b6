"""A desk's client for etrm-sync, as small as it can be while doing it right (docs/contract.md):

- one `Idempotency-Key` per batch, kept for every retry of that batch, so a retry after a
  timeout or a 503 can never queue the records twice;
- retries on 503 (nothing of the request was queued), 429 (rate limit) and connection errors,
  waiting what `Retry-After` says (or a capped, jittered exponential backoff), within a deadline;
- a 409 `duplicate_request` means an earlier try with this key was accepted (its answer was
  lost): the batch it names is this batch; a 409 `request_in_flight` is waited out;
- any other 4xx is final: it prints the problem's fields and stops (sending it again would
  change nothing);
- then it polls the batch until every record is in a final state and prints the outcomes.

    python examples/settlement_client.py --url http://127.0.0.1:8080 --token "$TOKEN" records.json

`records.json` is `{"records": [...]}` (the body of POST /v1/settlements/batches); every record
carries the same `settlement_run_id`, which is sent as `X-Settlement-Run-ID`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FINAL = {"delivered", "held", "dead_lettered", "superseded", "released", "rejected", "parked"}
RETRYABLE = {429, 503}


class Refused(Exception):
    """The intake refused the request for good (a 4xx other than 429)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {problem.get('code')}: {problem.get('detail')}")
        self.status, self.problem = status, problem


@dataclass
class Submitted:
    batch_id: str
    message_ids: list[str]
    attempts: int
    idempotency_key: str
    earlier: bool = False  # accepted by an earlier try with the same key


@dataclass
class Outcome:
    batch_id: str
    counts: dict[str, int]
    messages: list[dict[str, Any]] = field(default_factory=list)


class SettlementClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        deadline_s: float = 120.0,
        backoff_cap_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )
        self._deadline_s = deadline_s
        self._cap = backoff_cap_s
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not a secret

    async def __aenter__(self) -> SettlementClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    def _wait(self, response: httpx.Response | None, attempt: int) -> float:
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.isdigit():
            return float(retry_after)
        return self._rng.uniform(0, min(self._cap, 0.2 * 2**attempt))  # full jitter

    async def _tries(
        self, send: Callable[[], Awaitable[httpx.Response]], what: str
    ) -> AsyncIterator[tuple[int, httpx.Response | None]]:
        """Yield each try's answer (None: no answer at all), waiting between tries what
        Retry-After says or a jittered backoff, until the deadline."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            response: httpx.Response | None = None
            # No answer: unknown whether it was queued; the same key makes the retry safe.
            with contextlib.suppress(httpx.TransportError):
                response = await send()
            yield attempt, response
            wait = self._wait(response, attempt)
            if time.monotonic() + wait - started > self._deadline_s:
                status = response.status_code if response is not None else "no answer"
                raise TimeoutError(f"{what}: not done within {self._deadline_s:.0f}s ({status})")
            await asyncio.sleep(wait)

    async def submit(
        self, records: list[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> Submitted:
        run_ids = {r.get("settlement_run_id") for r in records}
        if len(run_ids) != 1:
            raise ValueError("every record of a batch needs the same settlement_run_id")
        key = idempotency_key or uuid.uuid4().hex  # one key for every retry of this batch
        headers = {"X-Settlement-Run-ID": str(run_ids.pop()), "Idempotency-Key": key}

        def send() -> Awaitable[httpx.Response]:
            return self._http.post(
                "/v1/settlements/batches", json={"records": records}, headers=headers
            )

        async for attempt, response in self._tries(send, "batch"):
            if response is not None and response.status_code == 202:
                body = response.json()
                ids = [m["message_id"] for m in body["messages"]]
                return Submitted(body["batch_id"], ids, attempt, key)
            problem = _problem(response)
            if response is not None and response.status_code == 409:
                if problem.get("code") == "duplicate_request" and problem.get("batch_id"):
                    batch = await self._read(f"/v1/batches/{problem['batch_id']}")
                    ids = [m["message_id"] for m in batch["messages"]]
                    return Submitted(problem["batch_id"], ids, attempt, key, earlier=True)
                if problem.get("code") != "request_in_flight":
                    raise Refused(409, problem)
            elif response is not None and response.status_code not in RETRYABLE:
                raise Refused(response.status_code, problem)
        raise AssertionError("unreachable")

    async def _read(self, path: str) -> dict[str, Any]:
        """GET with the same patience as a submission: 429 and 503 are waited out."""
        async for _, response in self._tries(lambda: self._http.get(path), path):
            if response is not None and response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
            if response is not None and response.status_code not in RETRYABLE:
                raise Refused(response.status_code, _problem(response))
        raise AssertionError("unreachable")

    async def wait_final(self, batch_id: str, *, every_s: float = 0.5) -> Outcome:
        started = time.monotonic()
        while True:
            body = await self._read(f"/v1/batches/{batch_id}")
            if all(m["state"] in FINAL for m in body["messages"]):
                return Outcome(batch_id, body["counts"], body["messages"])
            if time.monotonic() - started > self._deadline_s:
                raise TimeoutError(f"batch {batch_id} not final within {self._deadline_s:.0f}s")
            await asyncio.sleep(every_s)


def _problem(response: httpx.Response | None) -> dict[str, Any]:
    if response is None or response.status_code < 400:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:200]}
    return body if isinstance(body, dict) else {"detail": str(body)[:200]}


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--token", required=True)
    parser.add_argument("--idempotency-key", default=None)
    parser.add_argument("records", type=Path)
    args = parser.parse_args(argv)
    records = json.loads(args.records.read_text())["records"]
    async with SettlementClient(args.url, args.token) as client:
        try:
            sent = await client.submit(records, idempotency_key=args.idempotency_key)
        except Refused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            for error in exc.problem.get("errors") or []:
                print(
                    f"  record {error.get('index')}: {error.get('field')}: {error.get('message')}",
                    file=sys.stderr,
                )
            return 1
        print(
            f"accepted batch {sent.batch_id}: {len(sent.message_ids)} record(s) "
            f"after {sent.attempts} attempt(s), key {sent.idempotency_key}"
        )
        outcome = await client.wait_final(sent.batch_id)
    for message in outcome.messages:
        print(f"  #{message['index']} {message['message_id']} {message['state']}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
