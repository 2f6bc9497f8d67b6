"""A development OpenID Connect provider, so the console works out of the box on `etrm-sync dev`
and in the tests: discovery, an authorization endpoint with a one-click sign-in per development
operator, the authorization-code grant with PKCE (S256 only, codes single-use and short-lived)
and the JWKS. ID tokens are issued for the console's client; access tokens are the API's own
(its issuer and audience), signed with the development key the intake trusts.

Never for production: anyone who reaches it may sign in as any listed operator.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ops.dev.devkeys import DEV_KID, mint_token

OPS_SCOPES = ["ops:read", "ops:replay", "ops:holds", "ops:upstream", "settlements:read"]
DEV_OPERATORS: dict[str, tuple[str, list[str]]] = {
    "ops-alice": ("ops", OPS_SCOPES),
    "ops-bob": ("ops", OPS_SCOPES),
    "ops-viewer": ("ops", ["ops:read"]),
}
CODE_TTL_S = 60


@dataclass
class IdpConfig:
    issuer: str  # this provider's own URL
    client_id: str
    redirect_uris: list[str]
    private_key: Path
    jwks: Path
    api_issuer: str  # access tokens are the API's bearer tokens
    api_audience: str
    users: dict[str, tuple[str, list[str]]] = field(default_factory=lambda: dict(DEV_OPERATORS))
    token_ttl_s: int = 3600


@dataclass
class _Grant:
    subject: str
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    expires: float


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def create_idp(config: IdpConfig) -> FastAPI:
    app = FastAPI(title="etrm-sync development identity provider", docs_url=None, redoc_url=None)
    grants: dict[str, _Grant] = {}

    def refuse(status: int, error: str, description: str) -> JSONResponse:
        return JSONResponse({"error": error, "error_description": description}, status_code=status)

    def authorize_problem(params: dict[str, str]) -> str | None:
        if params.get("client_id") != config.client_id:
            return "unknown client_id"
        if params.get("redirect_uri") not in config.redirect_uris:
            return "redirect_uri is not registered for this client"
        if params.get("response_type") != "code":
            return "only response_type=code"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "PKCE with S256 is required"
        if "openid" not in params.get("scope", "").split():
            return "the openid scope is required"
        return None

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> dict[str, Any]:
        return {
            "issuer": config.issuer,
            "authorization_endpoint": f"{config.issuer}/authorize",
            "token_endpoint": f"{config.issuer}/token",
            "jwks_uri": f"{config.issuer}/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", *OPS_SCOPES],
        }

    @app.get("/jwks")
    async def jwks() -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(config.jwks.read_text())
        return loaded

    @app.get("/authorize")
    async def authorize_page(request: Request) -> Response:
        params = dict(request.query_params)
        problem = authorize_problem(params)
        if problem:
            return HTMLResponse(f"<h1>Sign-in refused</h1><p>{html.escape(problem)}</p>", 400)
        hint = params.get("login_hint")
        if hint in config.users:  # the one-click development sign-in `etrm-sync dev` prints
            return issue_code(hint, params)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in params.items()
            if k in ("client_id", "redirect_uri", "state", "nonce", "code_challenge", "scope")
        )
        buttons = "".join(
            f'<form method="post" action="/authorize">{hidden}'
            f'<input type="hidden" name="user" value="{html.escape(user)}">'
            f'<button type="submit" id="sign-in-{html.escape(user)}">Sign in as '
            f"{html.escape(user)}</button> <small>{html.escape(' '.join(scopes))}</small></form>"
            for user, (_, scopes) in config.users.items()
        )
        return HTMLResponse(
            "<!doctype html><title>Development sign-in</title>"
            "<h1>etrm-sync development sign-in</h1>"
            "<p>Development only: pick an operator.</p>" + buttons
        )

    @app.post("/authorize")
    async def authorize(
        user: str = Form(),
        client_id: str = Form(),
        redirect_uri: str = Form(),
        code_challenge: str = Form(),
        scope: str = Form(),
        state: str | None = Form(None),
        nonce: str | None = Form(None),
    ) -> Response:
        params = {
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "code_challenge_method": "S256",
            "code_challenge": code_challenge,
            "scope": scope,
        }
        problem = authorize_problem(params) or (None if user in config.users else "unknown user")
        if problem:
            return HTMLResponse(f"<h1>Sign-in refused</h1><p>{html.escape(problem)}</p>", 400)
        return issue_code(user, {**params, "state": state, "nonce": nonce})

    def issue_code(user: str, params: dict[str, Any]) -> Response:
        now = time.time()
        for stale in [c for c, g in grants.items() if g.expires < now]:
            del grants[stale]
        code = secrets.token_urlsafe(32)
        redirect_uri = str(params["redirect_uri"])
        grants[code] = _Grant(
            user,
            str(params["client_id"]),
            redirect_uri,
            str(params["code_challenge"]),
            params.get("nonce"),
            now + CODE_TTL_S,
        )
        state = params.get("state")
        answer = {"code": code, **({"state": state} if state is not None else {})}
        return RedirectResponse(f"{redirect_uri}?{urlencode(answer)}", status_code=303)

    @app.post("/token")
    async def token(
        grant_type: str = Form(),
        code: str = Form(),
        redirect_uri: str = Form(),
        client_id: str = Form(),
        code_verifier: str = Form(),
    ) -> Response:
        if grant_type != "authorization_code":
            return refuse(400, "unsupported_grant_type", "only authorization_code")
        grant = grants.pop(code, None)  # single use, whatever happens next
        if grant is None or grant.expires < time.time():
            return refuse(400, "invalid_grant", "unknown, used or expired code")
        if grant.client_id != client_id or grant.redirect_uri != redirect_uri:
            return refuse(400, "invalid_grant", "client or redirect_uri differ from the request")
        if not hmac.compare_digest(_s256(code_verifier), grant.challenge):
            return refuse(400, "invalid_grant", "PKCE verification failed")
        desk, scopes = config.users[grant.subject]
        key = config.private_key.read_bytes()
        id_token = mint_token(
            key,
            issuer=config.issuer,
            audience=client_id,
            subject=grant.subject,
            desk=desk,
            scopes=["openid"],
            ttl_s=config.token_ttl_s,
            kid=DEV_KID,
            extra_claims={"nonce": grant.nonce, "name": grant.subject} if grant.nonce else {},
        )
        access_token = mint_token(
            key,
            issuer=config.api_issuer,
            audience=config.api_audience,
            subject=grant.subject,
            desk=desk,
            scopes=scopes,
            ttl_s=config.token_ttl_s,
            kid=DEV_KID,
        )
        return JSONResponse(
            {
                "access_token": access_token,
                "id_token": id_token,
                "token_type": "Bearer",
                "expires_in": config.token_ttl_s,
                "scope": " ".join(["openid", *scopes]),
            },
            headers={"Cache-Control": "no-store"},
        )

    return app
