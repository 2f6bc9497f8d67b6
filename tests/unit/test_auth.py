"""The token check and the access rules, without servers: every JWT attack is a 401 with a
reason, a good token of each allowed algorithm becomes the principal it names, and a rotated
JWKS file is picked up (within its cooldown)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from ingest.auth import JwksKeys, Principal, TokenVerifier
from ingest.problems import Problem
from tests.jwt_attacks import AUDIENCE, ISSUER, Keys, attacks


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("jwks"))


def verifier(keys: Keys) -> TokenVerifier:
    return TokenVerifier(JwksKeys(str(keys.path)), issuer=ISSUER, audience=AUDIENCE, leeway_s=30)


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")])
async def test_each_allowed_algorithm_yields_the_principal(keys: Keys, alg: str, kid: str) -> None:
    token = keys.token(alg, kid, contracts=["OTC-EAST-*"])
    who = await verifier(keys).verify(f"Bearer {token}")
    assert (who.subject, who.desk) == ("trader-9", "power-east")
    assert who.scopes == frozenset({"settlements:write", "settlements:read"})
    assert who.may_touch_contract("OTC-EAST-0001")
    assert not who.may_touch_contract("OTC-WEST-0001")
    assert not who.is_operator


async def test_every_attack_is_refused_with_401(keys: Keys) -> None:
    check = verifier(keys)
    outcomes: dict[str, object] = {}
    for name, token in attacks(keys).items():
        try:
            outcomes[name] = await check.verify(f"Bearer {token}")
        except Problem as refused:
            challenge = refused.headers.get("WWW-Authenticate", "")
            outcomes[name] = (refused.status, challenge.split(" ")[0])
    assert {name: o for name, o in outcomes.items() if o != (401, "Bearer")} == {}


@pytest.mark.parametrize(
    ("header", "challenge"),
    [
        # no bearer token presented: the bare challenge (RFC 6750, 3.1)
        (None, "Bearer"),
        ("", "Bearer"),
        ("Basic dXNlcjpwYXNz", "Bearer"),
        ("Bearer", "Bearer"),
        # one presented that fails: with its error code
        ("Bearer a.b", 'Bearer error="invalid_token"'),
    ],
)
async def test_missing_or_malformed_authorization_is_401(
    keys: Keys, header: str | None, challenge: str
) -> None:
    with pytest.raises(Problem) as refused:
        await verifier(keys).verify(header)
    assert refused.value.status == 401
    assert refused.value.headers["WWW-Authenticate"] == challenge


def test_operators_see_every_desk_and_desks_only_their_own() -> None:
    operator = Principal("op", "ops", frozenset({"ops:read"}), None, None, None)
    trader = Principal("t", "power-east", frozenset({"settlements:read"}), None, None, None)
    made_up = Principal("t", "gas-west", frozenset({"ops:foo"}), None, None, None)
    assert operator.sees_desk("power-east")
    assert trader.sees_desk("power-east")
    assert not trader.sees_desk("gas-west")
    assert not made_up.sees_desk("power-east")


async def test_a_rotated_key_set_is_read_once_the_cooldown_has_passed(
    tmp_path: Path,
) -> None:
    old, new = Keys(tmp_path), Keys(tmp_path)
    source = tmp_path / "jwks.json"
    source.write_text(old.path.read_text())
    check = TokenVerifier(
        JwksKeys(str(source), cooldown_s=0.2), issuer=ISSUER, audience=AUDIENCE, leeway_s=30
    )
    assert (await check.verify(f"Bearer {old.token()}")).desk == "power-east"
    rotated = json.loads(new.path.read_text())
    source.write_text(json.dumps(rotated))
    later = time.time() + 5
    os.utime(source, (later, later))
    deadline = time.monotonic() + 5
    while True:
        try:
            who = await check.verify(f"Bearer {new.token()}")
            break
        except Problem:
            assert time.monotonic() < deadline, "the rotated key was never picked up"
            await asyncio.sleep(0.05)
    assert who.subject == "trader-9"
    with pytest.raises(Problem):
        await check.verify(f"Bearer {old.token()}")


async def test_a_remembered_token_is_refused_once_its_key_is_rotated_out(tmp_path: Path) -> None:
    """The verifier remembers a verified token; the same token (same text) must still be refused
    as soon as the key that signed it leaves the key set."""
    old, new = Keys(tmp_path), Keys(tmp_path)
    source = tmp_path / "jwks.json"
    source.write_text(old.path.read_text())
    check = TokenVerifier(
        JwksKeys(str(source), cooldown_s=0.2), issuer=ISSUER, audience=AUDIENCE, leeway_s=30
    )
    bearer = f"Bearer {old.token()}"
    assert (await check.verify(bearer)).desk == "power-east"
    assert (await check.verify(bearer)).desk == "power-east"  # remembered
    source.write_text(new.path.read_text())
    later = time.time() + 5
    os.utime(source, (later, later))
    refused = await _refused_within(check, bearer, 5, "a token of a rotated-out key was accepted")
    assert refused.status == 401


async def test_a_remembered_token_is_refused_once_it_expires(keys: Keys) -> None:
    check = TokenVerifier(JwksKeys(str(keys.path)), issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    bearer = f"Bearer {keys.token(exp=int(time.time()) + 2)}"
    assert (await check.verify(bearer)).subject == "trader-9"
    assert (await check.verify(bearer)).subject == "trader-9"  # remembered
    with pytest.raises(Problem):  # the remembered token under another scheme is not taken
        await check.verify(bearer.replace("Bearer", "Basic"))
    refused = await _refused_within(check, bearer, 10, "an expired token was still accepted")
    assert (refused.status, refused.extra["reason"]) == (401, "token expired")


async def _refused_within(check: TokenVerifier, bearer: str, seconds: float, why: str) -> Problem:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await check.verify(bearer)
        except Problem as refused:
            return refused
        await asyncio.sleep(0.05)
    raise AssertionError(why)


async def test_the_token_command_mints_for_any_jwks_whose_key_you_hold(tmp_path: Path) -> None:
    """`etrm-sync token --new-key DIR` (the compose stack's way in) and `--key PEM` give tokens
    the intake accepts with that JWKS and nothing else."""
    from typer.testing import CliRunner

    from ops.cli import app

    issuer, audience = "https://idp.example.com", "etrm-sync"
    minted = CliRunner().invoke(
        app,
        ["token", "--new-key", str(tmp_path), "--issuer", issuer, "--audience", audience],
    )
    assert minted.exit_code == 0, minted.output
    token = minted.stdout.strip()
    jwks = tmp_path / "jwks.json"
    check = TokenVerifier(JwksKeys(str(jwks)), issuer=issuer, audience=audience, leeway_s=30)
    who = await check.verify(f"Bearer {token}")
    assert (who.desk, who.subject) == ("power-east", "trader-1")

    pem = tmp_path / "etrm-compose-es256.pem"
    again = CliRunner().invoke(
        app,
        ["token", "--key", str(pem), "--issuer", issuer, "--audience", audience, "--desk", "ops"],
    )
    assert again.exit_code == 0, again.output
    assert (await check.verify(f"Bearer {again.stdout.strip()}")).desk == "ops"
    other = TokenVerifier(JwksKeys(str(jwks)), issuer=issuer, audience="someone-else", leeway_s=30)
    with pytest.raises(Problem):
        await other.verify(f"Bearer {token}")
