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
