"""Opening the database: one engine per process, migrations, and the "schema is current" gate."""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from asyncpg.exceptions import PostgresError
from sqlalchemy import Connection, Engine, TextClause, event, text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
log = structlog.get_logger("etrm.ledger")


class SchemaBehind(RuntimeError):
    """The database is older than this code; run `etrm-sync migrate` first."""


class SchemaAhead(RuntimeError):
    """The database is newer than this code and does not declare that it still serves it."""


# A connection handed back less than this long ago is used without a ping.
PING_IDLE_S = 1.0
# As SQLAlchemy's pool_timeout: every connection busy this long is "database unavailable".
DIRECT_ACQUIRE_TIMEOUT_S = 30.0
_ADAPTER_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func")


def make_engine(
    url: str,
    pool_size: int = 10,
    *,
    custom_plans: bool = False,
    idle_in_transaction_s: float | None = None,
) -> AsyncEngine:
    """The process's engine. `custom_plans`: every statement is planned for its own parameters
    (`plan_cache_mode = force_custom_plan`) instead of the session's cached generic plan, for the
    desks' reads: a generic plan is made once per connection from the statistics of that moment
    and kept, so one made while the tables were small went on scanning them as they grew
    (measured on a fresh database while one desk sent 5,000-record batches: another desk's
    `GET /v1/batches/{id}` statement took ~10 ms at p50 on the cached plan against ~0.7 ms
    planned per call). The write path keeps cached plans: planning its larger statements on
    every call cost single-record throughput. `idle_in_transaction_s`: the server ends a
    session of this engine idle inside a transaction that long, releasing its locks
    (settings.DatabaseSettings.database_idle_in_transaction_s)."""
    server_settings: dict[str, str] = {}
    if custom_plans:
        server_settings["plan_cache_mode"] = "force_custom_plan"
    if idle_in_transaction_s is not None:
        server_settings["idle_in_transaction_session_timeout"] = (
            f"{max(1, round(idle_in_transaction_s * 1000))}ms"
        )
    connect_args: dict[str, Any] = {"server_settings": server_settings} if server_settings else {}
    # Bound parameters never reach an error message or a log: they carry record contents.
    engine = create_async_engine(
        url,
        # Overflow connections are closed when handed back: steady concurrency above the pool
        # size pays a connect and asyncpg's type introspection per request (seen in a profile
        # of single records from 16 clients), hence a default pool of 20. The overflow stays
        # as headroom for bursts.
        pool_size=pool_size,
        max_overflow=pool_size,
        hide_parameters=True,
        connect_args=connect_args,
    )
    _ping_when_idle(engine)
    _args, options = engine.dialect.create_connect_args(engine.url)
    for adapter_only in _ADAPTER_ONLY:  # SQLAlchemy's own, asyncpg.connect does not take them
        options.pop(adapter_only, None)
    _DIRECT[engine.sync_engine] = _Direct({**options, **connect_args}, pool_size)
    event.listen(engine.sync_engine, "engine_disposed", _dispose_direct)
    return engine


class _Change:
    """A change running under `bounded_change`: its deadline (unset until the database is found
    stalled), its task, and whether its COMMIT has been sent."""

    __slots__ = ("committing", "deadline", "task")

    def __init__(self, deadline: asyncio.Timeout, task: asyncio.Task[Any] | None) -> None:
        self.deadline, self.task, self.committing = deadline, task, False


_CHANGE: ContextVar[_Change | None] = ContextVar("etrm_change", default=None)


@asynccontextmanager
async def bounded_change(engine: AsyncEngine, timeout_s: float | None) -> AsyncIterator[None]:
    """A change (an operator's replay, approval, discard, hold decision or maintenance window)
    that gives up with TimeoutError when the database stalls — a stopped host or a storage
    hang holds a statement without an error — instead of holding the operator's request until
    it wakes. Once the change has run `timeout_s / 2`, the database is asked `SELECT 1` on a
    connection of its own; with no answer within `timeout_s / 2` the change is cut off. A
    database that answers is only slow (a replay of 100,000 dead letters, a lock held a while)
    and is asked again later, so a long change on a live database is never cut off. Only until
    its first COMMIT is sent (`change`): cut off before, nothing of it took effect (the
    statement in flight runs in a transaction that is never committed: SQLAlchemy invalidates
    a connection whose statement was cancelled, and Postgres rolls back what a closed
    connection left open); cut off during the COMMIT, nobody could say whether it took effect,
    so from there it waits for the answer, as it always did. `None`: no bound."""
    if timeout_s is None:
        yield
        return
    async with asyncio.timeout(None) as deadline:
        held = _Change(deadline, asyncio.current_task())
        token = _CHANGE.set(held)
        watch = asyncio.create_task(_watch_change(engine, held, timeout_s / 2))
        try:
            yield
        finally:
            watch.cancel()
            _CHANGE.reset(token)


async def _watch_change(engine: AsyncEngine, held: _Change, step_s: float) -> None:
    while True:
        await asyncio.sleep(step_s)
        try:
            async with asyncio.timeout(step_s):
                await fetch_direct(engine, "SELECT 1", {})
        except Exception as exc:
            if isinstance(exc, TimeoutError) or database_unavailable(exc):
                if not held.committing:
                    held.deadline.reschedule(asyncio.get_running_loop().time())
            else:
                log.warning("change_watch_failed", error=type(exc).__name__)
            return


@asynccontextmanager
async def change(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`engine.begin()` for a change that may run under `bounded_change`: its body may be cut
    off, its COMMIT is not."""
    async with engine.begin() as conn:
        yield conn
        held = _CHANGE.get()
        if held is not None and held.task is asyncio.current_task():  # (not a task it started)
            if held.deadline.expired():
                await asyncio.sleep(0)  # its cancellation is on the way: taken before the COMMIT
            held.deadline.reschedule(None)  # a stall found this instant no longer cuts it off
            held.committing = True


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Pessimistic disconnect handling, paid only where it can matter. SQLAlchemy's
    `pool_pre_ping` pings on every checkout, and for asyncpg a ping is BEGIN, a query and
    ROLLBACK: three round trips before every single-record acceptance (profiled: the largest
    share of the intake's database time). Here a connection whose socket is already closed is
    dropped at no cost, and one that sat idle for more than PING_IDLE_S is pinged; one used a
    moment ago is handed out as it is. A connection that died in between fails its statement,
    which invalidates the pool (SQLAlchemy's disconnect detection): that request is answered
    as "database unavailable" (retryable), the next ones get fresh connections."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        raw = getattr(dbapi_connection, "_connection", None)
        if raw is not None and raw.is_closed():
            raise DisconnectionError("connection closed while idle in the pool")
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_S:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise DisconnectionError("connection failed its ping") from exc


_ASYNCPG = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=256)
def _positional(statement: str) -> tuple[str, tuple[str, ...]]:
    compiled = sql(statement).compile(dialect=_ASYNCPG)
    return compiled.string, tuple(compiled.positiontup or ())


class _Direct:
    """asyncpg's own pool, beside the engine's, for `fetch_direct`: checking a connection out
    of SQLAlchemy's pool and back in (AsyncConnection, greenlet hop, pool events, reset on
    return) cost ~100 us of CPU per statement — as much as asyncpg's whole statement — on the
    intake's two statements per request, the desks' reads and the workers' claims and
    outcomes (measured: `SELECT 1` 160 us of CPU through the engine, 100 us through this pool,
    59 us on a bare connection). Its connections run nothing but single autocommit statements,
    which leave no session state behind (no SET, LISTEN, cursor or session lock), so they are
    handed back without asyncpg's reset query (a round trip per statement otherwise). Same
    server, login and connect options as the engine; connections are opened as needed, at most
    `size`, and closed after a minute unused. Made on first use, on the loop that uses it."""

    def __init__(self, connect: dict[str, Any], size: int) -> None:
        self.connect = connect
        self.size = size
        self.pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future[asyncpg.Pool] | None = None

    async def ready(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # made on another loop (or none yet): its own pool
            self.close()
            self._loop = loop
        if self.pool is not None:
            return self.pool
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        try:
            return await asyncio.shield(self._starting)
        except Exception:
            self._starting = None  # the next statement tries again
            raise

    async def _start(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            min_size=0,
            max_size=self.size,
            max_inactive_connection_lifetime=60.0,
            reset=_no_reset,
            **self.connect,
        )
        self.pool = pool
        return pool

    def close(self) -> None:
        """As the engine's `dispose()`: idle connections close now, one still running a
        statement when it is handed back (within DIRECT_CLOSE_S); off its loop, all now."""
        pool, loop = self.pool, self._loop
        self.pool, self._starting, self._loop = None, None, None
        if pool is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or running is not loop:
            pool.terminate()
            return
        closing = running.create_task(_close_gently(pool))
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)


DIRECT_CLOSE_S = 5.0
_CLOSING: set[asyncio.Task[None]] = set()


async def _close_gently(pool: asyncpg.Pool) -> None:
    try:
        async with asyncio.timeout(DIRECT_CLOSE_S):
            await pool.close()
    except BaseException:
        pool.terminate()
        raise


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Nothing to undo after a single autocommit statement (`_Direct`)."""


_DIRECT: weakref.WeakKeyDictionary[Engine, _Direct] = weakref.WeakKeyDictionary()


def _dispose_direct(engine: Engine) -> None:
    """`AsyncEngine.dispose()` closes the direct pool's connections too; the next statement
    opens new ones, as the engine's own pool does after a dispose."""
    direct = _DIRECT.get(engine)
    if direct is not None:
        direct.close()


async def fetch_direct(engine: AsyncEngine, statement: str, params: Mapping[str, Any]) -> list[Any]:
    """One statement, on its own (autocommit), run on asyncpg directly: for the intake's two
    statements per request, SQLAlchemy's execution layer (greenlet hop, execution context,
    cursor, result) cost about as much CPU as asyncpg itself, and its pool's checkout and
    checkin as much again (`_Direct`, made with the engine by `make_engine`). The statement is
    written with `:name` parameters as everywhere else, compiled once to asyncpg's positional
    form. Errors are asyncpg's own; a connection that broke under the statement (anything but
    a statement the server refused: lost, cancelled mid-statement, a client-side protocol
    error such as asyncpg's InternalClientError during a restart) is closed, never handed to
    the next request."""
    query, names = _positional(statement)
    args = [params[name] for name in names]
    direct = _DIRECT.get(engine.sync_engine)
    if direct is None:
        raise ValueError("fetch_direct takes an engine from ledger.db.make_engine")
    pool = await direct.ready()
    async with pool.acquire(timeout=DIRECT_ACQUIRE_TIMEOUT_S) as connection:
        try:
            return list(await connection.fetch(query, *args))
        except BaseException as exc:
            if not isinstance(exc, PostgresError):
                connection.terminate()
            raise


def array_literal(values: Iterable[str | int | bytes]) -> str:
    """A list as Postgres's array text (what `array_in` reads), for statements that take a big
    array as `CAST(CAST(:p AS text) AS text[])` (or int[], numeric[], bytea[]): asyncpg encodes
    a list parameter element by element on the event loop, with abstract-class checks per
    element — measured, 30 to 36 ms of one uninterrupted callback for a 5,000-record request's
    columns, while every other desk's request waited. A text parameter is one copy; building
    it runs where the caller builds the lists (off the loop for a big request), and Postgres
    parses it. Strings are quoted and escaped; bytes go as bytea hex (`\\x…`)."""
    parts = []
    for value in values:
        if isinstance(value, bytes):
            parts.append('"\\\\x' + value.hex() + '"')
        elif isinstance(value, int):
            parts.append(str(value))
        else:
            parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


def join_array_literals(literals: Sequence[str]) -> str:
    """Arrays of `array_literal` text, each non-empty, as one array of their elements in order.
    It runs on the event loop, with megabytes of sealed payloads, so the braces are not added
    around a joined whole (two more copies of it: measured 5 ms instead of 0.2 for the
    payloads of a 5,000-record batch)."""
    if len(literals) == 1:
        return literals[0]
    first, *middle, last = literals
    return ",".join([first[:-1], *(literal[1:-1] for literal in middle), last[1:]])


@functools.lru_cache(maxsize=1024)
def sql(statement: str) -> TextClause:
    """`text(statement)`, parsed once: the ledger's statements are constants, and building a
    TextClause (a regex pass over the SQL for its bind names) on every call was ~6 % of the
    intake's CPU under single records."""
    return text(statement)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def migrate(url: str) -> None:
    # Alembic's env runs its own event loop; give it a thread of its own.
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")


async def ensure_schema_current(engine: AsyncEngine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()

    def current(sync_conn: Connection) -> str | None:
        return MigrationContext.configure(sync_conn).get_current_revision()

    async with engine.connect() as conn:
        revision = await conn.run_sync(current)
        if revision == head:
            return
        known = revision is None or _known(script, revision)
        serves = None
        if not known:
            serves = (
                await conn.execute(
                    text("SELECT serves_code_at FROM schema_compatibility WHERE revision = :r"),
                    {"r": revision},
                )
            ).scalar_one_or_none()
    if known:
        raise SchemaBehind(
            f"database schema is at {revision or 'nothing'}, this code needs {head}: "
            "run `etrm-sync migrate`"
        )
    if serves != head:
        raise SchemaAhead(
            f"database schema is at {revision}, newer than this code ({head}), and does not "
            "serve it: deploy the newer release"
        )
    log.warning("schema_one_migration_ahead", database=revision, code=head)


def _known(script: ScriptDirectory, revision: str) -> bool:
    """A revision of this code's own migrations (so the database is behind, not ahead)."""
    from alembic.util.exc import CommandError

    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


_AWAY = (
    "Connection",
    "CannotConnectNow",
    "InternalClientError",  # the driver's protocol state broken (seen during restarts)
    "AdminShutdown",
    "CrashShutdown",
    "TooManyConnections",
    "InterfaceError",
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The error and everything behind it, each once: SQLAlchemy wraps asyncpg's errors in
    adapter errors of its own (`orig`), which name the driver's as their cause."""
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nested = current.orig if isinstance(current, DBAPIError) else None
        current = nested or current.__cause__ or current.__context__


def database_unavailable(exc: BaseException) -> bool:
    """True when an error means the database is away (restarting, shutting down, unreachable,
    connections lost), as opposed to a statement it refused, anywhere in its chain of causes."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    for current in _causes(exc):
        if isinstance(
            current, OperationalError | InterfaceError | PoolTimeout | OSError | TimeoutError
        ):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if type(current).__module__.startswith("asyncpg") and any(
            word in type(current).__name__ for word in _AWAY
        ):
            return True
    return False


def deadlocked(exc: BaseException) -> bool:
    """True when Postgres rolled the statement (or transaction) back to break a deadlock
    (SQLSTATE 40P01), however the driver and SQLAlchemy wrapped it."""
    return any(getattr(current, "sqlstate", None) == "40P01" for current in _causes(exc))
