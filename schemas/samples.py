"""Sample settlement records of every source kind, for the demo, the benchmarks and the tests."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.records import UTC_FORMAT


def run_id(rng: random.Random | None = None) -> str:
    pick = rng or random.Random()  # noqa: S311 - sample run ids, not secrets
    return "".join(pick.choice(string.ascii_uppercase + string.digits) for _ in range(16))


def canonical(
    run: str,
    contract: str,
    *,
    market: str = "iso_real_time",
    revision: int = 1,
    position: str = "25.500",
    price: str = "-12.75",
    hour: int = 14,
) -> dict[str, Any]:
    return {
        "settlement_run_id": run,
        "contract_id": contract,
        "market": market,
        "delivery_point": "PJM-WESTERN-HUB",
        "delivery_start": f"2026-11-27T{hour:02d}:00:00Z",
        "delivery_end": f"2026-11-27T{hour:02d}:05:00Z",
        "position_mwh": position,
        "settlement_price": price,
        "revision": revision,
        "timestamp_utc": "2026-11-27T15:00:00Z",
    }


def iso_award(
    run: str,
    contract: str,
    *,
    hour_ending: int = 17,
    iso: str = "PJM",
    awarded: Any = "150.000",
    price: Any = "42.1250",
    revision: int = 1,
) -> dict[str, Any]:
    return {
        "kind": "iso_day_ahead_award",
        "settlement_run_id": run,
        "contract_id": contract,
        "iso": iso,
        "node": "PJM-RTO-ZONE-PSEG",
        "operating_day": "2026-11-27",
        "hour_ending": hour_ending,
        "awarded_mw": awarded,
        "clearing_price": price,
        "revision": revision,
        "timestamp_utc": "2026-11-26T16:30:00Z",
    }


def otc_confirmation(
    run: str,
    trade: str,
    *,
    side: str = "sell",
    volume: Any = "400",
    price: Any = "55.25",
    revision: int = 1,
) -> dict[str, Any]:
    return {
        "kind": "otc_confirmation",
        "settlement_run_id": run,
        "trade_id": trade,
        "counterparty": "Northwind Energy LLC",
        "side": side,
        "delivery_point": "ERCOT-HB-NORTH",
        "delivery_start": "2026-12-01T06:00:00Z",
        "delivery_end": "2026-12-02T06:00:00Z",
        "volume_mwh": volume,
        "fixed_price": price,
        "revision": revision,
        "timestamp_utc": "2026-11-27T18:45:00Z",
    }


def gas_nomination(
    run: str,
    contract: str,
    *,
    quantity: Any = "10000",
    price: Any = "3.15",
    unit: str = "MMBtu",
    revision: int = 1,
) -> dict[str, Any]:
    return {
        "kind": "physical_nomination",
        "settlement_run_id": run,
        "contract_id": contract,
        "commodity": "gas",
        "point": "HENRY-HUB",
        "flow_date": "2026-11-28",
        "quantity": quantity,
        "unit": unit,
        "price": price,
        "revision": revision,
        "timestamp_utc": "2026-11-27T12:00:00Z",
    }


def mixed_batch(
    run: str, count: int, *, contracts: int = 50, prefix: str = "CT"
) -> list[dict[str, Any]]:
    """`count` distinct records spread over `contracts` contracts, every kind represented;
    each record of a contract has its own delivery period, so no two share an identity."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    records: list[dict[str, Any]] = []
    for i in range(count):
        contract = f"{prefix}-{i % contracts:05d}"
        slot = i // contracts
        start = base + timedelta(hours=slot)
        kind = i % 4
        if kind == 0:
            rec = canonical(run, contract, position=f"{(i % 500) + 1}.250")
            rec["delivery_start"] = start.strftime(UTC_FORMAT)
            rec["delivery_end"] = (start + timedelta(minutes=5)).strftime(UTC_FORMAT)
        elif kind == 1:
            rec = iso_award(run, contract, hour_ending=1 + slot % 23, awarded=f"{i % 900}.5")
            rec["operating_day"] = (base + timedelta(days=slot)).date().isoformat()
        elif kind == 2:
            rec = otc_confirmation(run, contract, volume=str(10 + i % 300))
            rec["delivery_start"] = start.strftime(UTC_FORMAT)
            rec["delivery_end"] = (start + timedelta(hours=1)).strftime(UTC_FORMAT)
        else:
            rec = gas_nomination(run, contract, quantity=str(1000 + i))
            rec["flow_date"] = (base + timedelta(days=slot)).date().isoformat()
        records.append(rec)
    return records
