"""`etrm-sync demo`: submit sample batches of every kind to a running stack and show what became
of each record — delivered, deduplicated, held for drift, superseded, rejected by the upstream,
and dead-lettered after the upstream stayed in maintenance past the retry budget."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from ops.dev.devkeys import mint_token
from schemas import samples

FINAL = {"delivered", "held", "dead_lettered", "superseded", "released", "rejected"}


async def _submit(
    http: httpx.AsyncClient, run: str, records: list[dict[str, Any]], key: str
) -> httpx.Response:
    return await http.post(
        "/v1/settlements/batches",
        json={"records": records},
        headers={"X-Settlement-Run-ID": run, "Idempotency-Key": key},
    )


async def _wait_final(
    http: httpx.AsyncClient, batch_ids: list[str], timeout: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    batches: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for batch_id in batch_ids:
            batches[batch_id] = (await http.get(f"/v1/batches/{batch_id}")).json()
        if all(m["state"] in FINAL for b in batches.values() for m in b["messages"]):
            break
        await asyncio.sleep(0.5)
    return batches


def dev_token(env: dict[str, str], subject: str, desk: str, scopes: str) -> str:
    """A token from the dev stack's own signing key (see `etrm-sync dev`)."""
    return mint_token(
        Path(env["ETRM_DEV_JWT_PRIVATE_KEY"]),
        issuer=env["ETRM_JWT_ISSUER"],
        audience=env["ETRM_JWT_AUDIENCE"],
        subject=subject,
        desk=desk,
        scopes=scopes.split(),
    )


async def run_demo(env: dict[str, str], console: Console | None = None) -> int:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)
    token = dev_token(env, "demo-trader", "power-east", "settlements:write settlements:read")
    base = f"http://{env['ETRM_INTAKE_HOST']}:{env['ETRM_INTAKE_PORT']}"
    run = samples.run_id()
    tag = uuid.uuid4().hex[:6].upper()
    labelled: list[tuple[str, dict[str, Any]]] = [
        ("ISO day-ahead award (PJM)", samples.iso_award(run, f"PJM-DA-{tag}")),
        (
            "ISO day-ahead award (ERCOT, negative price)",
            samples.iso_award(run, f"ERC-DA-{tag}", iso="ERCOT", price="-8.5000"),
        ),
        ("ISO real-time price (priority lane)", samples.canonical(run, f"RT-{tag}-01")),
        ("OTC bilateral confirmation", samples.otc_confirmation(run, f"OTC-{tag}-77")),
        ("Gas nomination in MMBtu", samples.gas_nomination(run, f"GAS-{tag}-HH")),
        (
            "Upstream rejects (contract not booked)",
            samples.otc_confirmation(run, f"REJECT-{tag}", side="buy"),
        ),
        ("Reconciled position drifts 2 %", samples.iso_award(run, f"DRIFT-{tag}")),
        (
            "Upstream in maintenance past the budget",
            samples.gas_nomination(run, f"OUTAGE-{tag}", unit="MWh", quantity="240"),
        ),
    ]
    records = [r for _, r in labelled]
    async with httpx.AsyncClient(
        base_url=base, timeout=30.0, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        first = await _submit(http, run, records, f"demo-{tag}-1")
        if first.status_code != 202:
            console.print(f"[red]submission refused: {first.status_code} {first.text}")
            return 1
        batch = first.json()
        console.print(f"batch {batch['batch_id']}: {batch['accepted']} records accepted (202)")
        same_key = await _submit(http, run, records, f"demo-{tag}-1")
        console.print(
            f"same batch, same Idempotency-Key  -> {same_key.status_code} "
            f"({same_key.json().get('code')}, names {same_key.json().get('batch_id')})"
        )
        again = await _submit(http, run, records, f"demo-{tag}-2")
        console.print(
            f"same batch, new Idempotency-Key   -> {again.status_code}; same message "
            "ids, so the workers deliver nothing twice"
        )
        rev3 = samples.otc_confirmation(run, f"OTC-{tag}-RV", revision=3, volume="410")
        correction = await _submit(http, run, [rev3], f"demo-{tag}-rev3")
        await _wait_final(http, [correction.json()["batch_id"]], 30)
        late = samples.otc_confirmation(run, f"OTC-{tag}-RV", revision=2, volume="405")
        stale = await _submit(http, run, [late], f"demo-{tag}-rev2")
        labelled += [
            ("OTC correction, revision 3", rev3),
            ("OTC revision 2 arriving after revision 3", late),
        ]
        ids = [
            batch["batch_id"],
            again.json()["batch_id"],
            correction.json()["batch_id"],
            stale.json()["batch_id"],
        ]
        console.print("waiting for the workers …")
        batches = await _wait_final(http, ids, 60)
        table = Table(title=f"What became of run {run}")
        for column in (
            "record",
            "contract",
            "state",
            "attempts",
            "upstream transaction",
            "last error",
        ):
            table.add_column(column)
        messages = (
            batches[batch["batch_id"]]["messages"]
            + batches[ids[2]]["messages"]
            + batches[ids[3]]["messages"]
        )
        for (label, _record), message in zip(labelled, messages, strict=True):
            detail = (await http.get(f"/v1/settlements/{message['message_id']}")).json()
            colour = {"delivered": "green", "held": "yellow", "superseded": "cyan"}.get(
                detail["state"], "red"
            )
            table.add_row(
                label,
                detail["contract_id"],
                f"[{colour}]{detail['state']}",
                str(detail["attempts"]),
                detail["upstream_transaction_id"] or "",
                (detail["last_error"] or "")[:60],
            )
        console.print(table)
        dedup = batches[ids[1]]["counts"]
        console.print(f"resubmitted batch (new key): {dedup} — same messages, no new effects")
        sim = (await http.get(f"{env['ETRM_UPSTREAM_URL']}/_sim/received")).json()
        console.print(
            f"ETRM simulator: {sim['effects']} effects, {sim['duplicate_posts']} duplicate "
            f"POSTs answered from its Idempotency-Key store, {sim['rejected_posts']} rejected, "
            f"{sim['failed_posts']} failed (maintenance)"
        )
        await _operations_follow_up(http, env, console, run, tag)
    return 0


async def _operations_follow_up(
    http: httpx.AsyncClient, env: dict[str, str], console: Console, run: str, tag: str
) -> None:
    """The ops desk's side: the maintenance window ends, the dead letter is replayed, the
    drift hold is reviewed and released."""
    ops_token = dev_token(env, "ops-demo", "ops", "ops:read ops:replay ops:holds")
    ops_headers = {"Authorization": f"Bearer {ops_token}"}
    await http.patch(f"{env['ETRM_UPSTREAM_URL']}/_sim/config", json={"down_contracts": []})
    console.print("\n[bold]Operations[/]: the upstream's maintenance window is over.")
    queue = (
        await http.get(
            "/v1/reconciliation",
            headers=ops_headers,
            params={"settlement_run_id": run, "reason": "retries_exhausted"},
        )
    ).json()["items"]
    outage = next(i for i in queue if i["contract_id"] == f"OUTAGE-{tag}")
    replay = (
        await http.post(
            "/v1/reconciliation/replay",
            headers=ops_headers,
            json={"message_ids": [outage["message_id"]], "reason": "ETRM maintenance window ended"},
        )
    ).json()
    console.print(
        f"replay {replay['replay_id']}: {replay['count']} dead letter, state {replay['state']}"
    )
    for _ in range(60):  # the replay republishes in the background
        progress = (
            await http.get(f"/v1/reconciliation/replay/{replay['replay_id']}", headers=ops_headers)
        ).json()
        if progress["state"] == "completed":
            break
        await asyncio.sleep(0.25)
    state = ""
    for _ in range(60):
        state = (await http.get(f"/v1/settlements/{outage['message_id']}")).json()["state"]
        if state in FINAL:
            break
        await asyncio.sleep(0.5)
    console.print(
        f"OUTAGE-{tag} after replay: [green]{state}[/] (same message id, so the "
        "upstream's Idempotency-Key guarantees one effect)"
    )
    holds = (await http.get("/v1/holds", headers=ops_headers, params={"state": "open"})).json()[
        "items"
    ]
    hold = next(h for h in holds if h["contract_id"] == f"DRIFT-{tag}")
    console.print(
        f"hold {hold['hold_id']}: submitted {hold['submitted_position_mwh']} MWh, "
        f"reconciled {hold['reconciled_position_mwh']} MWh, "
        f"variance {hold['variance']}"
    )
    released = (
        await http.post(
            f"/v1/holds/{hold['hold_id']}/release",
            headers=ops_headers,
            json={"reason": "ISO meter correction confirmed"},
        )
    ).json()
    console.print(f"DRIFT-{tag} after review: [green]{released['state']}[/]")
