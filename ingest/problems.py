"""RFC 9457 problem details: the one builder every error response goes through. Every string in
a problem is made safe to render (a lone surrogate or NUL from a hostile request is escaped,
never a reason for a 500)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from schemas.api import ProblemDetails
from schemas.text import cap_text

PROBLEM_TYPE = "https://etrm-sync.dev/problems/"


class Problem(Exception):
    """Raise anywhere in a request; the app turns it into application/problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        if status in (408, 413):  # the body was not read to its end: the connection cannot stay
            self.headers.setdefault("Connection", "close")
        self.extra = extra

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a worker process (a big batch's validation) and re-raised here: pickled
        # with its keyword arguments, which Exception's own pickling drops.
        return (_problem, (self.status, self.code, self.detail, self.headers, self.extra))


def _problem(
    status: int, code: str, detail: str, headers: dict[str, str], extra: dict[str, Any]
) -> Problem:
    return Problem(status, code, detail, headers=headers, **extra)


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return cap_text(value, 1024)
    if isinstance(value, dict):
        return {_safe(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    return value


def problem_response(problem: Problem, trace_id: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + problem.code,
        "title": _TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
    }
    if trace_id:
        body["trace_id"] = trace_id
    body.update(problem.extra)
    return JSONResponse(
        _safe(body),
        status_code=problem.status,
        headers=problem.headers,
        media_type="application/problem+json",
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: these statuses answer problem+json."""
    return {
        status: {
            "model": ProblemDetails,
            "description": _TITLES.get(status, "Error"),
            "content": {"application/problem+json": {}},
        }
        for status in statuses
    }
