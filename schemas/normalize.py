"""Source format -> canonical record (CONTRACT §2). Pure functions, no I/O.

Calendar rules kept here: ISO hours count from local midnight in the ISO's market time, so a DST
day has 23 or 25 hours; MISO is EST all year; the NAESB gas day runs 09:00 to 09:00 Central clock
time; power nominations are UTC days. MMBtu converts at 0.29307107 MWh, rounded half-even.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter, ValidationError

from schemas.records import (
    CanonicalRecord,
    CanonicalSubmission,
    Iso,
    IsoDayAheadAward,
    Market,
    OtcConfirmation,
    PhysicalNomination,
    Position,
    Price,
    SourceRecord,
    utc_text,
)

MWH_PER_MMBTU = Decimal("0.29307107")
_MISO_EST = timezone(timedelta(hours=-5), "EST")
_CENTRAL = ZoneInfo("America/Chicago")

ISO_MARKET_TIME: dict[Iso, tzinfo] = {
    Iso.PJM: ZoneInfo("America/New_York"),
    Iso.NYISO: ZoneInfo("America/New_York"),
    Iso.ISONE: ZoneInfo("America/New_York"),
    Iso.ERCOT: _CENTRAL,
    Iso.SPP: _CENTRAL,
    Iso.CAISO: ZoneInfo("America/Los_Angeles"),
    Iso.MISO: _MISO_EST,
}


class NormalizationError(ValueError):
    """A source record that is well-formed but cannot become a valid canonical record."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _local_midnight_utc(day: str, zone: tzinfo) -> datetime:
    return datetime.combine(datetime.fromisoformat(day).date(), time(0), zone).astimezone(UTC)


def _too_late(field: str) -> NormalizationError:
    """A day so late its delivery period would end past 9999-12-31 (no UTC instant names it)."""
    return NormalizationError((field,), "is too late: its delivery period would end after 9999")


def hours_in_market_day(day: str, zone: tzinfo) -> int:
    start = _local_midnight_utc(day, zone)
    next_day = (datetime.fromisoformat(day).date() + timedelta(days=1)).isoformat()
    return int((_local_midnight_utc(next_day, zone) - start).total_seconds() // 3600)


# A desk's awards come a market day at a time (24 hours for each of its nodes), so an award's
# delivery period is worked out once per ISO, day and hour: the zone arithmetic cost ~10 µs a
# record.
@functools.lru_cache(maxsize=8192)
def _award_period(day: str, zone: tzinfo, hour_ending: int) -> tuple[int, tuple[str, str] | None]:
    """The market day's hours, and the hour's delivery period (None past the day's last)."""
    try:
        hours = hours_in_market_day(day, zone)
        if hour_ending > hours:
            return hours, None
        start = _local_midnight_utc(day, zone) + timedelta(hours=hour_ending - 1)
        return hours, (utc_text(start), utc_text(start + timedelta(hours=1)))
    except OverflowError:
        raise _too_late("operating_day") from None


def _iso_award(rec: IsoDayAheadAward) -> dict[str, Any]:
    hours, period = _award_period(rec.operating_day, ISO_MARKET_TIME[rec.iso], rec.hour_ending)
    if period is None:
        raise NormalizationError(
            ("hour_ending",),
            f"{rec.operating_day} has {hours} hours in {rec.iso.value} market time",
        )
    start, end = period
    return {
        "contract_id": rec.contract_id,
        "market": Market.ISO_DAY_AHEAD,
        "delivery_point": rec.node,
        "delivery_start": start,
        "delivery_end": end,
        "position_mwh": rec.awarded_mw,
        "settlement_price": rec.clearing_price,
        "source": {
            "kind": rec.kind,
            "iso": rec.iso.value,
            "node": rec.node,
            "operating_day": rec.operating_day,
            "hour_ending": rec.hour_ending,
        },
    }


def _otc(rec: OtcConfirmation) -> dict[str, Any]:
    sign = 1 if rec.side == "buy" else -1
    return {
        "contract_id": rec.trade_id,
        "market": Market.OTC_BILATERAL,
        "delivery_point": rec.delivery_point,
        "delivery_start": rec.delivery_start,
        "delivery_end": rec.delivery_end,
        "position_mwh": rec.volume_mwh * sign,
        "settlement_price": rec.fixed_price,
        "source": {
            "kind": rec.kind,
            "trade_id": rec.trade_id,
            "counterparty": rec.counterparty,
            "side": rec.side,
        },
    }


@functools.lru_cache(maxsize=4096)
def _flow_period(flow_date: str, commodity: str) -> tuple[str, str]:
    """A nomination's delivery period: its gas day (09:00 to 09:00 Central clock time) or its
    UTC day; worked out once per flow date (a desk nominates a day's flows together)."""
    flow_day = datetime.fromisoformat(flow_date).date()
    try:
        if commodity == "gas":
            start = datetime.combine(flow_day, time(9), _CENTRAL).astimezone(UTC)
            end = datetime.combine(flow_day + timedelta(days=1), time(9), _CENTRAL)
            return utc_text(start), utc_text(end.astimezone(UTC))
        midnight = datetime.combine(flow_day, time(0), UTC)
        return utc_text(midnight), utc_text(midnight + timedelta(days=1))
    except OverflowError:
        raise _too_late("flow_date") from None


def _nomination(rec: PhysicalNomination) -> dict[str, Any]:
    start, end = _flow_period(rec.flow_date, rec.commodity)
    if rec.unit == "MMBtu":
        position = (rec.quantity * MWH_PER_MMBTU).quantize(Decimal("0.001"), ROUND_HALF_EVEN)
        price = (rec.price / MWH_PER_MMBTU).quantize(Decimal("0.0001"), ROUND_HALF_EVEN)
    else:
        position, price = rec.quantity, rec.price
    return {
        "contract_id": rec.contract_id,
        "market": Market.PHYSICAL_NOMINATION,
        "delivery_point": rec.point,
        "delivery_start": start,
        "delivery_end": end,
        "position_mwh": position,
        "settlement_price": price,
        "source": {
            "kind": rec.kind,
            "commodity": rec.commodity,
            "unit": rec.unit,
            "flow_date": rec.flow_date,
        },
    }


def _canonical(rec: CanonicalSubmission) -> dict[str, Any]:
    return {
        "contract_id": rec.contract_id,
        "market": rec.market,
        "delivery_point": rec.delivery_point,
        "delivery_start": rec.delivery_start,
        "delivery_end": rec.delivery_end,
        "position_mwh": rec.position_mwh,
        "settlement_price": rec.settlement_price,
        "source": {"kind": "canonical"},
    }


# Where a canonical field came from in each source format, so an error names the field the
# desk actually sent.
_SOURCE_FIELD: dict[type[Any], dict[str, str]] = {
    IsoDayAheadAward: {
        "position_mwh": "awarded_mw",
        "settlement_price": "clearing_price",
        "delivery_point": "node",
        "delivery_start": "hour_ending",
        "delivery_end": "hour_ending",
    },
    OtcConfirmation: {
        "contract_id": "trade_id",
        "position_mwh": "volume_mwh",
        "settlement_price": "fixed_price",
    },
    PhysicalNomination: {
        "position_mwh": "quantity",
        "settlement_price": "price",
        "delivery_point": "point",
    },
}


# The canonical fields that normalization computes, by source format, each checked with the
# canonical record's own type. Every other field is copied from one its source model validated
# with the same type (an OTC fixed_price with a narrower one: a positive Price), and a delivery
# period made by `utc_text` is a real instant in the UTC format; so the canonical record is
# built without validating those again (that second validation was ~13 µs of a record's ~33).
_POSITION: TypeAdapter[Decimal] = TypeAdapter(Position)
_PRICE: TypeAdapter[Decimal] = TypeAdapter(Price)
_COMPUTED: dict[type[Any], tuple[tuple[str, TypeAdapter[Decimal]], ...]] = {
    OtcConfirmation: (("position_mwh", _POSITION),),  # the volume, signed by the side
    PhysicalNomination: (("position_mwh", _POSITION), ("settlement_price", _PRICE)),
}


def _built(rec: SourceRecord, fields: dict[str, Any]) -> CanonicalRecord | None:
    """The canonical record from fields its source model validated, or None when a computed
    field or a market rule does not hold (then full validation says which, and how)."""
    try:
        for name, adapter in _COMPUTED.get(type(rec), ()):
            adapter.validate_python(fields[name])
        record = CanonicalRecord.model_construct(**fields)
        record.check_market_rules()
    except ValueError:  # pydantic's ValidationError is one
        return None
    return record


def normalize(rec: SourceRecord) -> CanonicalRecord:
    if isinstance(rec, IsoDayAheadAward):
        fields = _iso_award(rec)
    elif isinstance(rec, OtcConfirmation):
        fields = _otc(rec)
    elif isinstance(rec, PhysicalNomination):
        fields = _nomination(rec)
    else:
        fields = _canonical(rec)
    fields.update(
        settlement_run_id=rec.settlement_run_id,
        timestamp_utc=rec.timestamp_utc,
        revision=rec.revision,
        currency=rec.currency,
    )
    built = _built(rec, fields)
    if built is not None:
        return built
    try:
        return CanonicalRecord.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        renamed = _SOURCE_FIELD.get(type(rec), {})
        if loc and isinstance(loc[0], str):
            loc = (renamed.get(loc[0], loc[0]), *loc[1:])
        if not loc and "settlement_price" in error["msg"]:
            loc = (renamed.get("settlement_price", "settlement_price"),)
        elif not loc and "delivery_start" in error["msg"]:
            loc = (renamed.get("delivery_start", "delivery_start"),)
        raise NormalizationError(loc, error["msg"].removeprefix("Value error, ")) from None
