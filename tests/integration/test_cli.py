"""`etrm-sync` as an operator meets it: `--json` is JSON and nothing else on stdout, errors are one
line on stderr with a non-zero exit, lists page instead of truncating, and a replay goes from
request to a second operator's approval to delivery on the command line alone."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from schemas import samples
from tests.conftest import PipelineFactory, submit_batch
from tests.support import OPS, assert_effects_once, run_cli, wait_for

pytestmark = pytest.mark.integration


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_version_is_printed() -> None:
    done = await run_cli({}, "--version")
    assert done.code == 0
    assert re.fullmatch(r"etrm-sync \S+\n", done.stdout), done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list", "--json"],
        ["replays", "list", "--json"],
        ["messages", "show", "m-1", "--json"],
        ["holds", "list", "--json"],
        ["audit", "verify", "--json"],
        ["upstream", "status", "--json"],
    ],
)
async def test_an_unreachable_database_is_one_line_on_stderr(args: list[str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Reading commands need the database alone: no signing or encryption keys are given.
    done = await run_cli(
        {"ETRM_DATABASE_URL": f"postgresql+asyncpg://etrm:hunter2-pw@127.0.0.1:{port}/etrm"},
        *args,
    )
    assert done.code != 0
    assert done.stdout == ""
    line = one_line_error(done.stderr)
    assert "database unreachable" in line
    assert "hunter2" not in line


async def test_operator_commands_page_show_and_replay_with_four_eyes(
    pipeline_factory: PipelineFactory, tmp_path: Path
) -> None:
    pipe = await pipeline_factory(
        sim={"reject_contracts": ["REJECT-*"]},
        replay_approval_threshold=1,
        breaker_failures=1000,
    )
    desk = pipe.client()
    run = samples.run_id()
    records = [samples.otc_confirmation(run, f"REJECT-CLI-{i}") for i in range(3)]
    batch = await submit_batch(desk, run, records)
    final = await pipe.wait_final(desk, batch.json()["batch_id"])
    ids = [m["message_id"] for m in final["messages"]]
    assert {m["state"] for m in final["messages"]} == {"dead_lettered"}

    # A page of two, the rest behind the cursor printed on stderr; a reader needs no keys.
    reader = {"ETRM_DATABASE_URL": pipe.env["ETRM_DATABASE_URL"]}
    page = await run_cli(
        reader, "dlq", "list", "--limit", "2", "--settlement-run-id", run, "--json"
    )
    assert page.code == 0, page.stderr
    first = json.loads(page.stdout)
    cursor = re.search(r"--cursor (\S+)", page.stderr)
    assert cursor is not None, page.stderr
    rest = await run_cli(
        pipe.env, "dlq", "list", "--limit", "2", "--run", run, "--cursor", cursor[1], "--json"
    )
    assert rest.code == 0, rest.stderr
    listed = first + json.loads(rest.stdout)
    assert sorted(i["message_id"] for i in listed) == sorted(ids)
    assert "--cursor" not in rest.stderr

    shown = await run_cli(pipe.env, "messages", "show", ids[0], "--json")
    assert shown.code == 0, shown.stderr
    message = json.loads(shown.stdout)
    assert message["state"] == "dead_lettered"
    assert message["contract_id"] == "REJECT-CLI-0"
    assert [h["state"] for h in message["history"]][-1] == "dead_lettered"
    missing = await run_cli(pipe.env, "messages", "show", "no-such-id", "--json")
    assert missing.code == 1
    assert missing.stdout == ""
    assert "no message" in one_line_error(missing.stderr)

    # Operators act with their own tokens through the API: who acts is the token's subject.
    def operator_env(subject: str) -> dict[str, str]:
        token_file = tmp_path / f"{subject}.token"
        token_file.write_text(pipe.token(desk="ops", scopes=OPS, subject=subject) + "\n")
        return {
            **pipe.env,
            "ETRM_API_URL": pipe.intake.url,
            "ETRM_OPERATOR_TOKEN_FILE": str(token_file),
        }

    alice, bob = operator_env("op-alice"), operator_env("op-bob")
    asked = await run_cli(
        alice, "dlq", "replay", "--settlement-run-id", run, "--reason", "ref data fixed", "--json"
    )
    assert asked.code == 0, asked.stderr
    request = json.loads(asked.stdout)
    assert request["state"] == "pending_approval"
    replay_id = request["replay_id"]
    waiting = await run_cli(pipe.env, "replays", "list", "--state", "pending_approval", "--json")
    assert [r["replay_id"] for r in json.loads(waiting.stdout)] == [replay_id]

    own = await run_cli(alice, "replays", "approve", replay_id, "--json")
    assert own.code == 1
    assert own.stdout == ""
    assert "refused (four_eyes)" in one_line_error(own.stderr)
    # Whoever holds the database credentials but no token cannot approve as anyone at all.
    nameless = await run_cli(pipe.env, "replays", "approve", replay_id, "--json")
    assert nameless.code == 1
    assert "token_required" in one_line_error(nameless.stderr)
    assert "--operator" not in (await run_cli({}, "replays", "approve", "--help")).stdout

    pipe.sim.config.reject_contracts = []  # the ETRM's reference data is fixed
    approved = await run_cli(bob, "replays", "approve", replay_id, "--reason", "checked", "--json")
    assert approved.code == 0, approved.stderr
    json.loads(approved.stdout)

    async def delivered() -> bool:
        batch_now = (await desk.get(f"/v1/batches/{batch.json()['batch_id']}")).json()
        return {m["state"] for m in batch_now["messages"]} == {"delivered"}

    await wait_for(delivered, timeout=60)
    assert_effects_once(pipe.sim, ids)
    status = await run_cli(pipe.env, "replays", "show", replay_id, "--json")
    assert status.code == 0, status.stderr
    replay = json.loads(status.stdout)
    assert (replay["requested_by"], replay["approved_by"]) == ("op-alice", "op-bob")
    assert replay["outcome"] == {"delivered": 3}
