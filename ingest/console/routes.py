"""Console pages and their forms. Every page needs a signed-in operator holding `ops:read`; every
form needs the session's CSRF token and a same-origin `Origin`, and the scope the API route of
the same action needs. Actions call the same operations service as the API, as the signed-in
operator (the token's subject), so four-eyes and the audit trail treat both alike.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from ingest.auth import Principal
from ingest.console.oidc import OidcClient, SignIn, SignInFailed
from ingest.console.session import (
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    SESSION_COOKIE,
    CookieSealer,
    clear_cookie,
    cookie_header,
)
from ingest.deps import IntakeServices, actor_of
from ingest.problems import Problem
from ingest.routes.operations import REFUSALS, DeadLetterQuery, start_run
from operations.rules import replay_id_valid
from operations.service import OperationRefused
from schemas.records import iso_z
from schemas.states import DeadLetterReason, DeadLetterStatus

log = structlog.get_logger("etrm.console")
router = APIRouter(prefix="/console", include_in_schema=False)
_TEMPLATES = Path(__file__).parent / "templates"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
SESSION_MAX_S = 12 * 3600
MAX_FORM_BYTES = 1024 * 1024
FILTER_FIELDS = ("desk", "settlement_run_id", "contract_id", "reason", "status", "since", "until")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # The sign-in code must not leak to another site in a Referer; and with `no-referrer` a
    # browser sends `Origin: null` on our own forms, which the CSRF check must refuse.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _shown(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, Decimal):
        return f"{value:f}"
    return "" if value is None else value


_env.filters["shown"] = _shown


class SignInNeeded(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class ConsoleRefusal(Exception):
    """An error page (status, title, what to do)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        self.status, self.title, self.detail = status, title, detail


class Console:
    """Built on first use from the intake's settings."""

    def __init__(self, svc: IntakeServices) -> None:
        settings = svc.settings
        if not (settings.oidc_issuer and settings.oidc_client_id):
            raise RuntimeError("console is off")
        self.sealer = CookieSealer.from_keyring(settings.encryption_keyring())
        self.oidc = OidcClient(
            settings.oidc_issuer,
            settings.oidc_client_id,
            settings.oidc_scopes,
            f"{settings.public_base()}/console/callback",
        )


def _console(request: Request) -> tuple[IntakeServices, Console]:
    svc: IntakeServices = request.app.state.services
    if not svc.settings.console_enabled:
        raise Problem(
            404, "console_off", "the console is off: set ETRM_OIDC_ISSUER and ETRM_OIDC_CLIENT_ID"
        )
    console: Console | None = getattr(request.app.state, "console", None)
    if console is None:
        console = request.app.state.console = Console(svc)
    return svc, console


class Operator:
    def __init__(self, who: Principal, csrf: str, request: Request) -> None:
        self.who, self.csrf, self.request = who, csrf, request

    @property
    def actor(self) -> Any:
        return actor_of(self.request, self.who)

    def require(self, scope: str) -> None:
        if scope not in self.who.scopes:
            raise ConsoleRefusal(
                403, "Not allowed", f"This needs the {scope} scope, which your sign-in lacks."
            )


async def _operator(request: Request) -> tuple[IntakeServices, Operator]:
    svc, console = _console(request)
    session = console.sealer.open(SESSION_COOKIE, request.cookies.get(SESSION_COOKIE))
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if session is None:
        raise SignInNeeded(target)
    try:
        # Exactly as the API applies a bearer token: keys, issuer, audience, expiry, scopes.
        who = await svc.verifier.verify(f"Bearer {session['token']}")
    except Problem:
        raise SignInNeeded(target) from None
    request.state.principal = who
    svc.rate_limiter.check(who.desk, who.subject)
    if "ops:read" not in who.scopes:
        raise ConsoleRefusal(
            403, "Not an operator", "The console needs the ops:read scope; your sign-in lacks it."
        )
    return svc, Operator(who, str(session["csrf"]), request)


async def _form(request: Request, op: Operator) -> dict[str, list[str]]:
    """The posted form, after the CSRF checks: the session's token, and an Origin (when the
    browser sends one, as all current ones do on POST) that is this site's."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin is not None and origin != own and origin != _public_origin(request):
        raise ConsoleRefusal(403, "Refused", "This form was sent from another site.")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ConsoleRefusal(413, "Too large", "The form is too large.")
    fields: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=100_000)
    except (UnicodeDecodeError, ValueError):
        raise ConsoleRefusal(400, "Malformed form", "The form could not be read.") from None
    for key, value in pairs:
        fields.setdefault(key, []).append(value)
    sent = (fields.get("csrf") or [""])[0]
    if not hmac.compare_digest(sent.encode(), op.csrf.encode()):
        raise ConsoleRefusal(403, "Refused", "The form's security token is missing or stale.")
    return fields


def _public_origin(request: Request) -> str:
    svc: IntakeServices = request.app.state.services
    base = svc.settings.public_base()
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _one(fields: Mapping[str, list[str]], name: str) -> str:
    return (fields.get(name) or [""])[0].strip()


def _reason(fields: Mapping[str, list[str]]) -> str:
    reason = _one(fields, "reason")
    if not reason or len(reason) > 1000:
        raise ConsoleRefusal(422, "A reason is needed", "Give a reason (1 to 1,000 characters).")
    return reason


def _page(template: str, op: Operator | None, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(
        who=op.who if op else None, csrf=op.csrf if op else "", **context
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _see_other(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303, headers=SECURITY_HEADERS)


def _refused(exc: OperationRefused) -> ConsoleRefusal:
    return ConsoleRefusal(REFUSALS.get(exc.code, 409), exc.code.replace("_", " "), exc.detail)


def _safe_next(path: str | None) -> str:
    """Only a path of this console, never another site (an open redirect)."""
    if not path or not path.startswith("/console") or path.startswith("//") or "\\" in path:
        return "/console"
    return path


# -- sign-in --------------------------------------------------------------------------------


@router.get("/login")
async def login(
    request: Request, next: str | None = None, login_hint: str | None = None
) -> Response:
    _, console = _console(request)
    sign_in = SignIn.start(_safe_next(next))
    # OpenID Connect's login_hint is passed on: the identity provider may pre-select the user.
    hint = login_hint[:64] if login_hint else None
    try:
        url = await console.oidc.authorization_url(sign_in, login_hint=hint)
    except SignInFailed as exc:
        raise ConsoleRefusal(502, "Sign-in unavailable", str(exc)) from None
    sealed = console.sealer.seal(
        LOGIN_COOKIE,
        {"s": sign_in.state, "n": sign_in.nonce, "v": sign_in.verifier, "x": sign_in.next_path},
        LOGIN_TTL_S,
    )
    response = _see_other(url)
    response.headers.append(
        "set-cookie", cookie_header(LOGIN_COOKIE, sealed, max_age=LOGIN_TTL_S, same_site="Lax")
    )
    return response


@router.get("/callback")
async def callback(
    request: Request,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    svc, console = _console(request)
    pending = console.sealer.open(LOGIN_COOKIE, request.cookies.get(LOGIN_COOKIE))
    if error:
        text = f"The identity provider answered: {error[:100]}"
        if error_description:
            text += f" ({error_description[:200]})"
        raise ConsoleRefusal(401, "Sign-in refused", text)
    if pending is None or not code or not state:
        raise ConsoleRefusal(
            400, "Sign-in expired", "This sign-in is unknown or older than 10 minutes; start again."
        )
    sign_in = SignIn(str(pending["s"]), str(pending["n"]), str(pending["v"]), str(pending["x"]))
    try:
        tokens = await console.oidc.redeem(sign_in, state=state, code=code)
    except SignInFailed as exc:
        log.warning("console_sign_in_failed", reason=str(exc))
        raise ConsoleRefusal(401, "Sign-in failed", str(exc)) from None
    try:
        who = await svc.verifier.verify(f"Bearer {tokens.access_token}")
    except Problem as exc:
        log.warning("console_token_refused", reason=exc.extra.get("reason"))
        raise ConsoleRefusal(
            403,
            "Token not accepted",
            f"The identity provider's access token is not one this API accepts "
            f"({exc.extra.get('reason', exc.code)}).",
        ) from None
    if who.subject != tokens.subject:
        raise ConsoleRefusal(403, "Sign-in failed", "The ID token and access token disagree.")
    session = console.sealer.seal(
        SESSION_COOKIE,
        {"token": tokens.access_token, "csrf": secrets.token_urlsafe(24)},
        SESSION_MAX_S,
    )
    log.info("console_signed_in", subject=who.subject, desk=who.desk)
    # A page, not a redirect: the session cookie is SameSite=Strict, and a browser sends it
    # only on a navigation that starts on this site, not on the identity provider's redirect.
    response = _page("signed_in.html", None, next_path=sign_in.next_path)
    response.headers.append(
        "set-cookie",
        cookie_header(SESSION_COOKIE, session, max_age=SESSION_MAX_S, same_site="Strict"),
    )
    response.headers.append("set-cookie", clear_cookie(LOGIN_COOKIE))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    _, op = await _operator(request)
    await _form(request, op)
    response = _page("signed_out.html", None)
    response.headers.append("set-cookie", clear_cookie(SESSION_COOKIE))
    return response


@router.get("/static/console.css")
async def stylesheet() -> Response:
    css = (_TEMPLATES / "console.css").read_text()
    return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})


# -- pages ------------------------------------------------------------------------------------


@router.get("")
async def overview(request: Request) -> Response:
    svc, op = await _operator(request)
    assert svc.console is not None
    summary = await svc.console.overview()
    upstream = await svc.operations.upstream_status()
    states = sorted({s for counts in summary.by_desk.values() for s in counts})
    return _page(
        "overview.html",
        op,
        summary=summary,
        states=states,
        upstream=upstream,
        lanes=svc.settings.lanes,
    )


@router.get("/search")
async def search(request: Request, q: str = "") -> Response:
    svc, op = await _operator(request)
    assert svc.console is not None
    q = q.strip()[:256]
    hits = await svc.console.search(q) if q else []
    if len(hits) == 1 and hits[0].message_id == q:
        return _see_other(f"/console/messages/{quote(q, safe='')}")
    return _page("search.html", op, q=q, hits=hits)


@router.get("/messages/{message_id}")
async def message(request: Request, message_id: str) -> Response:
    svc, op = await _operator(request)
    assert svc.console is not None
    found = await svc.ledger.get_message(message_id[:64], None)
    if found is None:
        raise ConsoleRefusal(404, "Not found", "No accepted record has this message id.")
    audit = await svc.console.audit_rows(found.message_id, found.batch_id)
    return _page("message.html", op, m=found, audit=audit)


def _filter_from(source: Mapping[str, Any]) -> DeadLetterQuery:
    values = {k: source.get(k) or None for k in FILTER_FIELDS}
    try:
        return DeadLetterQuery(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConsoleRefusal(422, "Bad filter", f"{field}: {first['msg']}") from None


@router.get("/reconciliation")
async def reconciliation(request: Request) -> Response:
    svc, op = await _operator(request)
    params = dict(request.query_params)
    where = _filter_from(params)
    cursor = params.get("cursor") or None
    try:
        items, next_cursor = await svc.operations.list_dead_letters(
            where.filter(), limit=50, cursor=cursor
        )
    except ValueError:
        raise ConsoleRefusal(
            400, "Bad cursor", "That page link is not one this console gave."
        ) from None
    chosen = {k: params[k] for k in FILTER_FIELDS if params.get(k)}
    next_url = (
        "/console/reconciliation?" + urlencode({**chosen, "cursor": next_cursor})
        if next_cursor
        else None
    )
    return _page(
        "reconciliation.html",
        op,
        items=items,
        chosen=chosen,
        fields=FILTER_FIELDS,
        reasons=list(DeadLetterReason),
        statuses=list(DeadLetterStatus),
        next_url=next_url,
    )


def _selection(fields: Mapping[str, list[str]]) -> tuple[list[str] | None, Any, dict[str, str]]:
    """What a replay form selects: ticked message ids, or every dead letter the filter matches."""
    if _one(fields, "scope") == "filter":
        chosen = {k: _one(fields, k) for k in FILTER_FIELDS if _one(fields, k)}
        return None, _filter_from(chosen).filter(), chosen
    ids = [m for m in fields.get("message_id", []) if m][:100_000]
    if not ids:
        raise ConsoleRefusal(422, "Nothing selected", "Tick the dead letters to replay.")
    return ids, None, {}


@router.post("/reconciliation/preview")
async def preview(request: Request) -> Response:
    svc, op = await _operator(request)
    fields = await _form(request, op)
    op.require("ops:replay")
    ids, where, chosen = _selection(fields)
    result = await svc.operations.preview_replay(message_ids=ids, where=where)
    return _page("preview.html", op, preview=result, ids=ids or [], chosen=chosen)


@router.post("/replays")
async def request_replay(request: Request) -> Response:
    svc, op = await _operator(request)
    fields = await _form(request, op)
    op.require("ops:replay")
    ids, where, _ = _selection(fields)
    reason = _reason(fields)
    actor = op.actor
    try:
        created = await svc.operations.request_replay(
            actor, message_ids=ids, where=where, reason=reason
        )
    except OperationRefused as exc:
        raise _refused(exc) from None
    if created.state == "approved":
        start_run(request, created.replay_id, actor, svc)
    return _see_other(f"/console/replays/{created.replay_id}")


@router.get("/replays")
async def replays(request: Request, state: str | None = None) -> Response:
    svc, op = await _operator(request)
    assert svc.console is not None
    rows = await svc.console.replays(state[:32] if state else None)
    return _page("replays.html", op, replays=rows, state=state or "")


@router.get("/replays/{replay_id}")
async def replay(request: Request, replay_id: str) -> Response:
    svc, op = await _operator(request)
    assert svc.console is not None
    job = await svc.operations.replay_status(replay_id) if replay_id_valid(replay_id) else None
    if job is None:
        raise ConsoleRefusal(404, "Not found", "No replay has this id.")
    items = await svc.console.replay_items(replay_id)
    mine = job["requested_by"].casefold() == op.who.subject.casefold()
    return _page("replay.html", op, job=job, items=items, mine=mine)


@router.post("/replays/{replay_id}/approve")
async def approve(request: Request, replay_id: str) -> Response:
    svc, op = await _operator(request)
    fields = await _form(request, op)
    op.require("ops:replay")
    if not replay_id_valid(replay_id):
        raise ConsoleRefusal(404, "Not found", "No replay has this id.")
    actor = op.actor
    try:
        await svc.operations.approve_replay(replay_id, actor, _one(fields, "reason") or None)
    except OperationRefused as exc:
        raise _refused(exc) from None
    start_run(request, replay_id, actor, svc)
    return _see_other(f"/console/replays/{replay_id}")


@router.post("/reconciliation/{dead_letter_id}/discard")
async def discard(request: Request, dead_letter_id: str) -> Response:
    svc, op = await _operator(request)
    fields = await _form(request, op)
    op.require("ops:replay")
    actor = op.actor
    try:
        result = await svc.operations.discard(dead_letter_id[:64], actor, _reason(fields))
    except OperationRefused as exc:
        raise _refused(exc) from None
    if result["continuation_id"]:
        start_run(request, result["continuation_id"], actor, svc)
    return _see_other("/console/reconciliation?status=open")


@router.get("/holds")
async def holds(request: Request, state: str = "open") -> Response:
    svc, op = await _operator(request)
    rows = await svc.operations.list_holds(state=state[:16] or None, desk=None, limit=500)
    return _page("holds.html", op, holds=rows, state=state)


@router.post("/holds/{hold_id}/{decision}")
async def decide(request: Request, hold_id: str, decision: str) -> Response:
    svc, op = await _operator(request)
    fields = await _form(request, op)
    op.require("ops:holds")
    outcome = {"release": "released", "reject": "rejected"}.get(decision)
    if outcome is None:
        raise ConsoleRefusal(404, "Not found", "Holds are released or rejected.")
    try:
        await svc.operations.decide_hold(hold_id[:64], outcome, op.actor, _reason(fields))
    except OperationRefused as exc:
        raise _refused(exc) from None
    return _see_other("/console/holds")


def install(app: FastAPI) -> None:
    app.include_router(router)

    @app.exception_handler(SignInNeeded)
    async def sign_in(request: Request, exc: SignInNeeded) -> Response:
        if request.method != "GET":
            return _page(
                "error.html",
                None,
                status=401,
                title="Signed out",
                detail="Your session ended; sign in again and repeat the action.",
            )
        return _see_other("/console/login?" + urlencode({"next": exc.next_path}))

    @app.exception_handler(ConsoleRefusal)
    async def refusal(request: Request, exc: ConsoleRefusal) -> Response:
        return _page("error.html", None, status=exc.status, title=exc.title, detail=exc.detail)
