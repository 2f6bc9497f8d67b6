"""The checked-in API documents match the code (regenerate: `uv run python -m ops.docs`)."""

from __future__ import annotations

from ops.docs import DOCS, asyncapi_document, openapi_document, render


def test_openapi_is_current_and_has_examples_for_every_kind() -> None:
    document = openapi_document()
    assert (DOCS / "openapi.json").read_text() == render(document), "run python -m ops.docs"
    body = document["paths"]["/v1/settlements/sync"]["post"]["requestBody"]
    examples = body["content"]["application/json"]["examples"]
    kinds = {e["value"].get("kind", "canonical") for e in examples.values()}
    assert kinds == {"canonical", "iso_day_ahead_award", "otc_confirmation", "physical_nomination"}
    for path in (
        "/v1/reconciliation",
        "/v1/reconciliation/replay",
        "/v1/holds",
        "/v1/holds/{hold_id}/release",
        "/v1/batches/{batch_id}",
    ):
        assert path in document["paths"], path


def test_asyncapi_is_current_and_names_the_topics() -> None:
    document = asyncapi_document()
    assert (DOCS / "asyncapi.json").read_text() == render(document), "run python -m ops.docs"
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {
        "settlements.sync.priority",
        "settlements.sync.standard",
        "settlements.reconciliation",
    }


def test_every_answer_is_documented_with_its_real_shape() -> None:
    document = openapi_document()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    missing = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                if status.startswith("2") or status in ("304",):
                    if status == "204":
                        continue
                    schemas = [m.get("schema") for m in content.values()]
                    if not schemas or not all(schemas):
                        missing.append(f"{method.upper()} {path} {status}: no schema")
                else:
                    problem = content.get("application/problem+json", {}).get("schema", {})
                    if problem.get("$ref") != "#/components/schemas/ProblemDetails":
                        missing.append(f"{method.upper()} {path} {status}: not a problem")
    assert missing == []
    problem = document["components"]["schemas"]["ProblemDetails"]["properties"]
    assert {"type", "title", "status", "code", "detail", "errors"} <= set(problem)


def test_asyncapi_messages_carry_the_record_and_every_contract_header() -> None:
    document = asyncapi_document()
    every = {"message_id", "desk", "trader", "trace_id", "schema_version", "signature"}
    dead = every | {
        "error.reason",
        "error.status",
        "error.message",
        "error.attempts",
        "error.first_attempt_at",
        "error.last_attempt_at",
        "source.topic",
        "source.partition",
        "source.offset",
    }
    for name, message in document["components"]["messages"].items():
        assert message.get("payload"), name
        headers = set(message["headers"]["properties"])
        assert (dead if "reconciliation" in name else every) <= headers, name
        assert {"replay_of", "replay_count"} <= headers, name


def test_the_contract_in_the_repository_names_only_routes_and_settings_that_exist() -> None:
    """docs/contract.md is the contract desks integrate against: every HTTP route it lists is
    served, and every ETRM_ setting it names is read by some process."""
    import re

    from runtime.settings import StackSettings

    text = (DOCS / "contract.md").read_text()

    def shape(path: str) -> str:  # parameter names are the document's to choose
        return re.sub(r"{[^}]*}", "{}", path)

    served = {shape(p) for p in openapi_document()["paths"]}
    served |= {"/console", "/healthz", "/readyz", "/metrics"}
    listed = set()
    for line in text.splitlines():
        if line.startswith(("| GET", "| POST", "| DELETE")):
            for path in re.findall(r"(/[a-z0-9_/{}]+)", line.split("|")[1]):
                listed.add(shape(path))
    assert listed, "no routes found in docs/contract.md"
    assert listed <= served, listed - served
    fields = {f"ETRM_{name.upper()}" for name in StackSettings.model_fields}
    # Read before any settings object exists: the log level (runtime/logging.py).
    fields.add("ETRM_LOG_LEVEL")
    named = set(re.findall(r"`(ETRM_[A-Z0-9_]+)`", text))
    assert named <= fields, named - fields
