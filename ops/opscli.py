"""`etrm-sync dlq …` and `etrm-sync holds …`: the operations desk's commands.

State-changing commands (replay, approve, discard, release, reject, maintenance) go through the
intake's HTTP API when ETRM_API_URL and the operator's own token (ETRM_OPERATOR_TOKEN_FILE or
ETRM_OPERATOR_TOKEN) are set: the API's scopes apply and the actor is the token's subject, never
a flag. Without them they run the same service against the database and the broker as the
OS user (recorded as `db:<user>`, so the trail shows no token vouched for it), for a
break-glass operator who holds the database credentials — but
an approval is refused there: four eyes must know who approves. Reading commands need only the
database (and the encryption keys only where they show a payload). Every action is audited
like its API twin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import httpx
import structlog
import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from ledger import reads
from ledger import reconciliation as recon
from operations.service import OperationRefused, Operations, UpstreamOperations, operator_actor
from runtime.logging import configure_logging
from runtime.settings import OperatorApiSettings, OperatorSettings, SettingsError, load
from schemas.states import DeadLetterReason, HoldState, status_filter

dlq = typer.Typer(no_args_is_help=True, help="The reconciliation queue (dead letters).")
holds = typer.Typer(no_args_is_help=True, help="Drift holds awaiting review.")
console = Console()
# Errors and hints go to stderr: stdout stays the command's answer (--json).
err = Console(stderr=True, soft_wrap=True)
security_log = structlog.get_logger("etrm.security")
T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _operator() -> str:
    """Who acts in database mode (no token): the OS user, marked as such — never a name taken
    from a flag or a variable, and never one a token's subject could be mistaken for."""
    return f"db:{getpass.getuser()}"


class Api:
    """The intake's HTTP API, as the operator whose token this is."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self._token = url, token

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as http:
            response = await http.request(
                method, path, json=body, headers={"Authorization": f"Bearer {self._token}"}
            )
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {}
            code = problem.get("code") or f"http_{response.status_code}"
            raise OperationRefused(str(code), str(problem.get("detail") or response.reason_phrase))
        return response.json()


def _api() -> Api | None:
    settings = load(OperatorApiSettings)
    token = settings.token()
    if token is None:
        return None
    if settings.api_url is None:
        raise SettingsError("invalid setting(s): ETRM_API_URL: needed with an operator token")
    return Api(settings.api_url, token)


def _via(api: Api, call: Callable[[Api], Awaitable[T]]) -> T:
    configure_logging("operator", "WARNING")

    async def main() -> T:
        return await call(api)

    return _guarded(main)


def _filter_body(where: recon.DeadLetterFilter) -> dict[str, Any]:
    """The same filter as the API's replay body (the keys of GET /v1/reconciliation)."""
    return {
        k: v.isoformat() if isinstance(v, datetime) else v
        for k, v in dataclasses.asdict(where).items()
        if v is not None
    }


@asynccontextmanager
async def _operations() -> AsyncIterator[Operations]:
    from ops.bootstrap import close_operator, operator_services

    ops = await operator_services(load(OperatorSettings))
    try:
        yield ops
    finally:
        await close_operator(ops)


def _read(work: Callable[[Any], Awaitable[T]]) -> T:
    """A reading command: the database alone (no signing or encryption keys, no broker)."""
    configure_logging("operator", "WARNING")

    async def main() -> T:
        engine = await _engine()
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return _guarded(main)


def _run(work: Callable[[Operations], Awaitable[T]]) -> T:
    configure_logging("operator", "WARNING")  # to stderr: stdout is the command's answer

    async def main() -> T:
        async with _operations() as ops:
            return await work(ops)

    return _guarded(main)


def _guarded(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine; what goes wrong is one line on stderr and an exit code."""
    try:
        return asyncio.run(main())
    except SettingsError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except OperationRefused as exc:
        err.print(f"[red]refused ({exc.code}):[/] {escape(exc.detail)}")
        raise typer.Exit(1) from None
    except (DBAPIError, OSError, TimeoutError) as exc:
        # One line, never the URL (it may hold a password) nor a traceback.
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        err.print(f"[red]error:[/] database unreachable ({escape(type(cause).__name__)})")
        raise typer.Exit(3) from None
    except KafkaError as exc:
        err.print(f"[red]error:[/] broker unreachable ({escape(type(exc).__name__)})")
        raise typer.Exit(3) from None
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/] intake unreachable ({escape(type(exc).__name__)})")
        raise typer.Exit(3) from None


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _emit(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{k: _plain(v) for k, v in r.items()} for r in rows], indent=2))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(escape(str(_plain(row.get(c)))) if row.get(c) is not None else "" for c in columns)
        )
    console.print(table)


def _found(item: dict[str, Any] | None, what: str, ident: str) -> dict[str, Any]:
    """The item ready to print, or a one-line error and exit 1."""
    if item is None:
        err.print(f"[red]error:[/] no {what} {escape(ident)}")
        raise typer.Exit(1)
    return {k: _plain(v) for k, v in item.items()}


def _show(title: str, item: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(item, indent=2, default=_plain))
        return
    table = Table(title=escape(title), show_header=False)
    for key, value in item.items():
        shown = (
            json.dumps(value, indent=1, default=_plain)
            if isinstance(value, dict | list)
            else str(_plain(value))
        )
        table.add_row(key, escape(shown))
    console.print(table)


def _filter(
    desk: str | None,
    run: str | None,
    contract: str | None,
    reason: str | None,
    status: str | int | None,
    since: datetime | None,
    until: datetime | None,
) -> recon.DeadLetterFilter:
    return recon.DeadLetterFilter(desk, run, contract, reason, status, since, until)


DeskOpt = Annotated[str | None, typer.Option(help="Only this desk")]
RunOpt = Annotated[
    str | None, typer.Option("--settlement-run-id", "--run", help="Only this settlement run")
]
ContractOpt = Annotated[
    str | None, typer.Option("--contract-id", "--contract", help="Only this contract")
]


def _status(value: str | None) -> str | int | None:
    """A dead letter's status, or the upstream's HTTP status in it (as GET /v1/reconciliation)."""
    try:
        return None if value is None else status_filter(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


ReasonOpt = Annotated[DeadLetterReason | None, typer.Option(help="Only this dead-letter reason")]
StatusOpt = Annotated[
    str | None,
    typer.Option(
        help="Only this status (open, replaying, replayed, discarded, resolved), or the "
        "upstream's HTTP status (e.g. 422)",
        callback=_status,
    ),
]
SinceOpt = Annotated[datetime | None, typer.Option(help="Dead-lettered at or after (UTC)")]
UntilOpt = Annotated[datetime | None, typer.Option(help="Dead-lettered before (UTC)")]


@dlq.command("list")
def dlq_list(
    desk: DeskOpt = None,
    run: RunOpt = None,
    contract: ContractOpt = None,
    reason: ReasonOpt = None,
    status: StatusOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: int = 100,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters, oldest first, a page at a time (the next page's --cursor on stderr)."""
    where = _filter(desk, run, contract, reason, status, since, until)
    items, next_cursor = _read(
        lambda engine: recon.list_dead_letters(engine, where, limit=limit, cursor=cursor)
    )
    _emit(
        items,
        [
            "dead_letter_id",
            "message_id",
            "desk",
            "contract_id",
            "reason",
            "status",
            "attempts",
            "last_error",
            "created_at",
        ],
        "Reconciliation queue",
        as_json,
    )
    if next_cursor:
        err.print(f"more: etrm-sync dlq list --limit {limit} --cursor {next_cursor} …")


@dlq.command("show")
def dlq_show(dead_letter_id: str, as_json: JsonOpt = False) -> None:
    """One dead letter with its Kafka coordinates and headers."""
    item = _read(lambda engine: recon.get_dead_letter(engine, dead_letter_id))
    _show(dead_letter_id, _found(item, "dead letter", dead_letter_id), as_json)


@dlq.command("replay")
def dlq_replay(
    message_id: Annotated[
        list[str] | None, typer.Option("--id", help="Message id (repeat)")
    ] = None,
    desk: DeskOpt = None,
    run: RunOpt = None,
    contract: ContractOpt = None,
    reason_filter: Annotated[
        DeadLetterReason | None,
        typer.Option("--dead-letter-reason", help="Only this dead-letter reason"),
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    reason: Annotated[str | None, typer.Option(help="Why (required, audited)")] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would be replayed")] = False,
    approve: Annotated[
        str | None, typer.Option(help="Approve REPLAY_ID (four eyes; needs your token)")
    ] = None,
    resume: Annotated[str | None, typer.Option(help="Resume REPLAY_ID")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay dead letters by id or by filter: same message ids, per-contract order kept."""
    where = None if message_id else _filter(desk, run, contract, reason_filter, None, since, until)
    api = _api() if resume is None else None
    if api is not None:
        body = _filter_body(where) if where is not None else {}
        result = _via(
            api,
            lambda api: _replay_via_api(api, message_id, body, reason, dry_run, approve),
        )
        _print_replay(result, as_json)
        return
    if approve:
        err.print(
            "[red]refused (token_required):[/] approving needs your own token "
            "(ETRM_OPERATOR_TOKEN_FILE and ETRM_API_URL): four eyes must know who approves"
        )
        raise typer.Exit(1)
    actor = operator_actor(_operator())

    async def work(ops: Operations) -> dict[str, Any]:
        replay_id = resume  # approvals go through the API only (above)
        if replay_id is None:
            if dry_run:
                return await ops.preview_replay(message_ids=message_id, where=where)
            if not reason:
                raise OperationRefused("reason_required", "--reason is required")
            created = await ops.request_replay(
                actor, message_ids=message_id, where=where, reason=reason
            )
            if created.state != "approved":
                return {
                    "replay_id": created.replay_id,
                    "state": created.state,
                    "count": created.count,
                    "needs_approval": created.needs_approval,
                }
            replay_id = created.replay_id
        with Progress(console=console, disable=as_json) as bar:
            task = bar.add_task("replaying", total=None)
            ran = await ops.run_replay(
                replay_id, actor, lambda done, total: bar.update(task, completed=done, total=total)
            )
        status = await recon.get_replay(ops.engine, replay_id)
        return {
            "replay_id": replay_id,
            "ran": ran,
            **{k: _plain(v) for k, v in (status or {}).items()},
        }

    _print_replay(_run(work), as_json)


async def _replay_via_api(
    api: Api,
    message_ids: list[str] | None,
    where: dict[str, Any],
    reason: str | None,
    dry_run: bool,
    approve: str | None,
) -> dict[str, Any]:
    if approve:
        await api.call(
            "POST",
            f"/v1/reconciliation/replay/{approve}/approve",
            {"reason": reason} if reason else {},
        )
        status: dict[str, Any] = await api.call("GET", f"/v1/reconciliation/replay/{approve}")
        return status
    if not dry_run and not reason:
        raise OperationRefused("reason_required", "--reason is required")
    body: dict[str, Any] = {"message_ids": message_ids} if message_ids else {"filter": where}
    body.update(reason=reason or "dry run", dry_run=dry_run)
    answer: dict[str, Any] = await api.call("POST", "/v1/reconciliation/replay", body)
    return answer


def _print_replay(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=_plain))
        return
    if result.get("dry_run"):
        _emit(
            result["items"],
            ["dead_letter_id", "message_id", "desk", "contract_id", "reason"],
            f"Would replay {result['count']} (needs approval: {result['needs_approval']})",
            False,
        )
        return
    if result.get("state") == "pending_approval":
        console.print(
            f"replay {result['replay_id']} of {result['count']} record(s) needs a "
            "second operator: etrm-sync replays approve "
            f"{result['replay_id']} (with their own token)"
        )
        return
    console.print(
        f"replay {result['replay_id']}: {result.get('state')}, progress {result.get('progress')}"
    )


@dlq.command("discard")
def dlq_discard(
    dead_letter_id: str,
    reason: Annotated[str, typer.Option(help="Why (required, audited)")],
    as_json: JsonOpt = False,
) -> None:
    """Close a dead letter without delivery; parked records of its contract continue."""
    api = _api()
    if api is not None:
        result = _via(
            api,
            lambda api: api.call(
                "POST", f"/v1/reconciliation/{dead_letter_id}/discard", {"reason": reason}
            ),
        )
    else:
        actor = operator_actor(_operator())

        async def work(ops: Operations) -> dict[str, Any]:
            done = await ops.discard(dead_letter_id, actor, reason)
            if done["continuation_id"]:
                await ops.run_replay(done["continuation_id"], actor)
            return done

        result = _run(work)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(
            f"dead letter {dead_letter_id}: discarded; {result['continued']} parked record(s) "
            "continue"
        )


@holds.command("list")
def holds_list(
    state: Annotated[
        HoldState | None, typer.Option(help="Only holds in this state")
    ] = HoldState.OPEN,
    desk: DeskOpt = None,
    limit: int = 100,
    as_json: JsonOpt = False,
) -> None:
    """Held messages with submitted vs reconciled position and the variance."""
    rows = _read(lambda engine: recon.list_holds(engine, state=state, desk=desk, limit=limit))
    _emit(
        rows,
        [
            "hold_id",
            "desk",
            "contract_id",
            "submitted_position_mwh",
            "reconciled_position_mwh",
            "variance",
            "state",
            "created_at",
        ],
        "Drift holds",
        as_json,
    )


def _decide(hold_id: str, decision: str, reason: str, as_json: bool) -> None:
    api = _api()
    if api is not None:
        verb = {"released": "release", "rejected": "reject"}[decision]
        result = _via(
            api, lambda api: api.call("POST", f"/v1/holds/{hold_id}/{verb}", {"reason": reason})
        )
    else:
        actor = operator_actor(_operator())
        result = _run(lambda ops: ops.decide_hold(hold_id, decision, actor, reason))
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"hold {hold_id}: {result['state']}")


ReasonReq = Annotated[str, typer.Option(help="Why (required, audited)")]


@holds.command("release")
def holds_release(hold_id: str, reason: ReasonReq, as_json: JsonOpt = False) -> None:
    """Accept the reconciled position: the message becomes `released`."""
    _decide(hold_id, "released", reason, as_json)


@holds.command("reject")
def holds_reject(hold_id: str, reason: ReasonReq, as_json: JsonOpt = False) -> None:
    """Refuse it: the message becomes `rejected` and a `drift_rejected` dead letter."""
    _decide(hold_id, "rejected", reason, as_json)


audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail.")
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys for payloads at rest.")


async def _engine() -> Any:
    from ledger.db import ensure_schema_current, make_engine
    from runtime.settings import DatabaseSettings

    settings = load(DatabaseSettings)
    engine = make_engine(
        settings.database_url, 2, idle_in_transaction_s=settings.database_idle_in_transaction_s
    )
    await ensure_schema_current(engine)
    return engine


@audit_app.command("verify")
def audit_verify(as_json: JsonOpt = False) -> None:
    """Walk the whole chain and the signed checkpoints; name the first row that fails."""
    from ledger import audit

    async def work() -> dict[str, Any]:
        engine = await _engine()
        try:
            await audit.sequence_all(engine)  # anything appended but not chained yet
            chain = await audit.verify(engine)
            settings = load(OperatorSettings)
            public = settings.audit_verifier()
            checkpoints, problems = (
                await audit.verify_checkpoints(
                    engine,
                    public,
                    max_age_s=settings.audit_checkpoint_max_age_s,
                    external_dir=settings.checkpoint_dir(),
                )
                if public
                else (0, [])
            )
        finally:
            await engine.dispose()
        return {
            "ok": chain.ok and not problems,
            "rows": chain.rows,
            "head_seq": chain.head_seq,
            "head_hash": chain.head_hash,
            "first_bad_seq": chain.first_bad_seq,
            "problem": chain.problem,
            "unsequenced_late": chain.unsequenced_late,
            "checkpoints_verified": checkpoints if public else None,
            "checkpoint_problems": problems,
        }

    result = _guarded(work)
    if as_json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        checked = result["checkpoints_verified"]
        signed = "no checkpoint key given" if checked is None else f"{checked} signed checkpoints"
        console.print(
            f"[green]audit trail verifies[/]: {result['rows']} rows, head "
            f"{result['head_seq']} {result['head_hash'][:16]}…, {signed}"
        )
    else:
        if result["first_bad_seq"] is not None:
            console.print(
                f"[red]audit trail broken at row {result['first_bad_seq']}[/]: {result['problem']}"
            )
        elif result["problem"]:
            console.print(f"[red]{result['problem']}")
        for problem in result["checkpoint_problems"]:
            console.print(f"[red]{problem}")
    if not result["ok"]:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign the current head of the chain now (ETRM_AUDIT_SIGNING_KEY)."""
    from ledger import audit

    settings = load(OperatorSettings)
    signer = settings.audit_signer()
    if signer is None:
        err.print("[red]error:[/] ETRM_AUDIT_SIGNING_KEY is not set")
        raise typer.Exit(2)

    async def work() -> int | None:
        engine = await _engine()
        try:
            return await audit.write_checkpoint(engine, signer, settings.checkpoint_dir())
        finally:
            await engine.dispose()

    console.print(f"checkpoint at row {_guarded(work)}")


@keys_app.command("rotate")
def keys_rotate(as_json: JsonOpt = False) -> None:
    """Re-encrypt every stored payload to the first key of ETRM_ENCRYPTION_KEYS."""
    from ledger.crypto import PayloadCipher
    from ledger.keys import rotate

    settings = load(OperatorSettings)
    cipher = PayloadCipher(settings.encryption_keyring())
    actor = operator_actor(_operator())

    async def work() -> dict[str, int]:
        engine = await _engine()
        try:
            with Progress(console=console, disable=as_json) as bar:
                task = bar.add_task("re-encrypting", total=None)
                return await rotate(
                    engine,
                    cipher,
                    actor,
                    progress=lambda table, n: bar.update(task, description=f"{table}", completed=n),
                )
        finally:
            await engine.dispose()

    counts = _guarded(work)
    security_log.info("key_rotation", active_key=cipher.active_kid, operator=actor.name, **counts)
    if as_json:
        print(json.dumps({"active_key": cipher.active_kid, **counts}))
    else:
        console.print(f"payloads now under key {cipher.active_kid}: {counts}")


# -- the upstream (issue #8) -----------------------------------------------------------------

upstream_app = typer.Typer(
    no_args_is_help=True, help="The ETRM upstream: circuit breaker and maintenance windows."
)
maintenance_app = typer.Typer(no_args_is_help=True, help="Maintenance windows declared ahead.")
upstream_app.add_typer(maintenance_app, name="maintenance")

WINDOW_COLUMNS = ["id", "from", "until", "reason", "created_by"]


@upstream_app.command("status")
def upstream_status(as_json: JsonOpt = False) -> None:
    """The circuit breaker (closed, open, half_open) and the windows not yet over."""
    status = _read(lambda engine: UpstreamOperations(engine).upstream_status())
    if as_json:
        print(json.dumps(status, indent=2))
        return
    color = {"closed": "green", "open": "red", "half_open": "yellow"}[status["circuit"]]
    line = f"circuit [{color}]{status['circuit']}[/] since {status['since']}"
    if status["circuit"] != "closed":
        line += f" ({status['reason']}); next probe at {status['next_probe_at']}"
    console.print(line)
    if status["waiting"]:
        console.print(
            f"records wait: {status['waiting']['reason']} until {status['waiting']['until']}"
        )
    _emit(status["maintenance"], WINDOW_COLUMNS, "Maintenance windows", False)


def _when(name: str) -> Any:
    return typer.Option(
        name,
        parser=lambda text: _utc(datetime.fromisoformat(text)),
        metavar="ISO-8601",
        help="e.g. 2026-12-06T02:00:00Z (UTC unless an offset is given)",
    )


@maintenance_app.command("add")
def maintenance_add(
    start: Annotated[datetime, _when("--from")],
    until: Annotated[datetime, _when("--until")],
    reason: ReasonReq,
    as_json: JsonOpt = False,
) -> None:
    """Declare a window: no request is sent to the upstream inside it (audited)."""
    api = _api()
    if api is not None:
        body = {"from": start.isoformat(), "until": until.isoformat(), "reason": reason}
        window = _via(api, lambda api: api.call("POST", "/v1/upstream/maintenance", body))
    else:
        actor = operator_actor(_operator())
        window = _run(lambda ops: ops.add_maintenance(actor, start, until, reason))
    if as_json:
        print(json.dumps(window))
    else:
        console.print(f"maintenance {window['id']}: {window['from']} .. {window['until']}")


@maintenance_app.command("remove")
def maintenance_remove(window_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a window that is not over yet (audited)."""
    api = _api()
    if api is not None:
        window = _via(api, lambda api: api.call("DELETE", f"/v1/upstream/maintenance/{window_id}"))
    else:
        actor = operator_actor(_operator())
        window = _run(lambda ops: ops.cancel_maintenance(window_id, actor))
    if as_json:
        print(json.dumps(window))
    else:
        console.print(f"maintenance {window_id}: cancelled")


def _utc(moment: datetime) -> datetime:
    """typer reads dates without a zone: those are UTC, as every time in this system."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- replays and messages (issue #10) --------------------------------------------------------

replays_app = typer.Typer(no_args_is_help=True, help="Replays of dead letters and their approval.")
messages_app = typer.Typer(no_args_is_help=True, help="One record's state and history.")


@replays_app.command("list")
def replays_list(
    state: Annotated[
        str | None, typer.Option(help="pending_approval, approved, running, completed, …")
    ] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """Replays, newest first."""
    rows = _read(lambda engine: recon.list_replays(engine, state=state, limit=limit))
    _emit(
        rows,
        ["replay_id", "kind", "state", "item_count", "requested_by", "approved_by", "created_at"],
        "Replays",
        as_json,
    )


@replays_app.command("show")
def replays_show(replay_id: str, as_json: JsonOpt = False) -> None:
    """One replay: who asked and approved, progress, and what became of its records."""
    item = _read(lambda engine: recon.get_replay(engine, replay_id))
    _show(replay_id, _found(item, "replay", replay_id), as_json)


@replays_app.command("approve")
def replays_approve(
    replay_id: str,
    reason: Annotated[str | None, typer.Option(help="Why (audited)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a replay another operator requested (four eyes; with your own token), then the
    intake runs it."""
    dlq_replay(
        message_id=None,
        desk=None,
        run=None,
        contract=None,
        reason_filter=None,
        since=None,
        until=None,
        reason=reason,
        dry_run=False,
        approve=replay_id,
        resume=None,
        as_json=as_json,
    )


@messages_app.command("show")
def messages_show(message_id: str, as_json: JsonOpt = False) -> None:
    """A record's state, attempts, last error, dead letter and every state it went through."""
    found = _read(lambda engine: reads.get_message(engine, message_id, None))
    item = _found(None if found is None else dataclasses.asdict(found), "message", message_id)
    _show(message_id, item, as_json)
