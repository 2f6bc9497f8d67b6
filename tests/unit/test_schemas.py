"""Every schema rule of CONTRACT §2, one bad case each; normalization of each source kind."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.crypto import LaneSealer, PayloadCipher, open_lane_value
from schemas import normalize as normalize_module
from schemas import samples
from schemas.envelope import (
    OPTIONAL_SIGNED_HEADERS,
    SIGNED_HEADERS,
    envelope_for,
    lane_for,
    sign_message,
    validate_record,
    verify_message,
)
from schemas.records import CanonicalRecord, decimal_places

RUN = "RUN0000000000001"


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """A monkeypatch a Hypothesis test may use (the function-scoped one is not reset between
    its examples)."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def ok(raw: dict[str, Any]) -> CanonicalRecord:
    result = validate_record(raw, 0)
    assert isinstance(result, CanonicalRecord), result
    return result


def errors(raw: Any) -> list[tuple[str, str]]:
    result = validate_record(raw, 0)
    assert isinstance(result, list), f"accepted: {result}"
    return [(e.pointer, e.message) for e in result]


def fields(raw: Any) -> set[str]:
    return {pointer for pointer, _ in errors(raw)}


CANONICAL = samples.canonical(RUN, "RT-UNIT-0001")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"settlement_run_id": "run0000000000001"}, "settlement_run_id"),
        ({"settlement_run_id": "RUN00000000000012"}, "settlement_run_id"),
        ({"contract_id": "SHORT"}, "contract_id"),
        ({"contract_id": "X" * 33}, "contract_id"),
        ({"contract_id": "BAD/CONTRACT"}, "contract_id"),
        ({"market": "futures"}, "market"),
        ({"delivery_point": ""}, "delivery_point"),
        ({"delivery_point": "P" * 65}, "delivery_point"),
        ({"delivery_point": "NODE\n1"}, "delivery_point"),
        ({"delivery_start": "2026-02-30T00:00:00Z"}, "delivery_start"),
        ({"delivery_start": "2026-11-27 14:00:00"}, "delivery_start"),
        ({"delivery_end": "2026-11-27T25:00:00Z"}, "delivery_end"),
        ({"delivery_end": "2026-11-27T13:00:00Z"}, "delivery_start"),  # end before start
        ({"position_mwh": "100000.001"}, "position_mwh"),
        ({"position_mwh": "-100001"}, "position_mwh"),
        ({"position_mwh": "1.0005"}, "position_mwh"),
        ({"position_mwh": "NaN"}, "position_mwh"),
        ({"position_mwh": "Infinity"}, "position_mwh"),
        ({"position_mwh": True}, "position_mwh"),
        ({"position_mwh": 1.5}, "position_mwh"),  # a binary float never gets in
        ({"settlement_price": "12.12345"}, "settlement_price"),
        ({"settlement_price": "-10000.01"}, "settlement_price"),
        ({"currency": "usd"}, "currency"),
        ({"revision": 0}, "revision"),
        ({"revision": "2"}, "revision"),
        ({"timestamp_utc": "yesterday"}, "timestamp_utc"),
        ({"nickname": "unknown fields are refused"}, "nickname"),
    ],
)
def test_canonical_rules(change: dict[str, Any], field: str) -> None:
    assert field in fields(CANONICAL | change)


def test_negative_prices_only_in_iso_markets() -> None:
    assert ok(CANONICAL | {"settlement_price": "-9999.5"}).settlement_price == Decimal("-9999.5")
    otc_canonical = CANONICAL | {"market": "otc_bilateral", "settlement_price": "-1"}
    assert "settlement_price" in fields(otc_canonical)
    assert "settlement_price" in fields(
        CANONICAL | {"market": "physical_nomination", "settlement_price": "0"}
    )
    assert "fixed_price" in fields(samples.otc_confirmation(RUN, "OTC-UNIT-001", price="-5"))


def test_decimal_number_and_string_are_the_same_record() -> None:
    as_string = ok(CANONICAL | {"position_mwh": "125.5"})
    as_number = ok(CANONICAL | {"position_mwh": Decimal("125.50")})
    assert as_string.to_wire()["position_mwh"] == "125.500"
    assert envelope_for("d", as_string).message_id == envelope_for("d", as_number).message_id


def test_wire_format_has_full_scale_strings() -> None:
    wire = ok(CANONICAL | {"position_mwh": 7, "settlement_price": "-12.7"}).to_wire()
    assert wire["position_mwh"] == "7.000"
    assert wire["settlement_price"] == "-12.7000"
    assert wire["currency"] == "USD"
    assert wire["revision"] == 1
    assert wire["source"] == {"kind": "canonical"}


def test_unknown_kind_and_non_object() -> None:
    assert fields(CANONICAL | {"kind": "weather_derivative"}) == {"kind"}
    assert errors(["not", "an", "object"])


# -- ISO day-ahead awards ---------------------------------------------------------------------


def test_iso_award_normalization_pjm() -> None:
    rec = ok(samples.iso_award(RUN, "PJM-DA-00001", hour_ending=17, awarded="150", price="-4.25"))
    assert rec.market.value == "iso_day_ahead"
    assert rec.delivery_point == "PJM-RTO-ZONE-PSEG"
    # 2026-11-27 is EST (UTC-5): HE17 = 16:00 local = 21:00Z
    assert (rec.delivery_start, rec.delivery_end) == (
        "2026-11-27T21:00:00Z",
        "2026-11-27T22:00:00Z",
    )
    assert rec.position_mwh == Decimal(150)
    assert rec.settlement_price == Decimal("-4.25")
    assert rec.source["iso"] == "PJM"
    assert rec.source["hour_ending"] == 17


@pytest.mark.parametrize(
    ("iso", "day", "hours"),
    [
        ("PJM", "2026-03-08", 23),
        ("PJM", "2026-11-01", 25),
        ("ERCOT", "2026-03-08", 23),
        ("CAISO", "2026-11-01", 25),
        ("MISO", "2026-03-08", 24),
        ("MISO", "2026-11-01", 24),
        ("NYISO", "2026-07-01", 24),
    ],
)
def test_iso_market_day_length(iso: str, day: str, hours: int) -> None:
    last = samples.iso_award(RUN, "ISO-DST-0001", iso=iso, hour_ending=hours) | {
        "operating_day": day
    }
    ok(last)
    beyond = last | {"hour_ending": hours + 1}
    if hours + 1 <= 25:
        assert fields(beyond) == {"hour_ending"}


def test_fall_back_hours_are_distinct_instants() -> None:
    base = samples.iso_award(RUN, "PJM-DST-0001") | {"operating_day": "2026-11-01"}
    he2 = ok(base | {"hour_ending": 2})
    he3 = ok(base | {"hour_ending": 3})
    assert he2.delivery_start == "2026-11-01T05:00:00Z"  # 01:00 EST, the repeated hour
    assert he3.delivery_start == "2026-11-01T06:00:00Z"


def test_miso_is_eastern_standard_time_all_year() -> None:
    rec = ok(
        samples.iso_award(RUN, "MISO-DA-0001", iso="MISO", hour_ending=1)
        | {"operating_day": "2026-07-01"}
    )
    assert rec.delivery_start == "2026-07-01T05:00:00Z"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"iso": "AESO"}, "iso"),
        ({"hour_ending": 0}, "hour_ending"),
        ({"operating_day": "2026-13-01"}, "operating_day"),
        ({"awarded_mw": "1e6"}, "awarded_mw"),
        ({"clearing_price": "-10001"}, "clearing_price"),
        ({"node": ""}, "node"),
    ],
)
def test_iso_award_rules(change: dict[str, Any], field: str) -> None:
    assert field in fields(samples.iso_award(RUN, "PJM-DA-00002") | change)


# -- OTC confirmations ----------------------------------------------------------------------


def test_otc_normalization_buy_and_sell() -> None:
    buy = ok(samples.otc_confirmation(RUN, "OTC-TRADE-01", side="buy", volume="400.5"))
    sell = ok(samples.otc_confirmation(RUN, "OTC-TRADE-02", side="sell", volume="400.5"))
    assert buy.contract_id == "OTC-TRADE-01"
    assert buy.market.value == "otc_bilateral"
    assert buy.position_mwh == Decimal("400.5")
    assert sell.position_mwh == Decimal("-400.5")
    assert buy.source == {
        "kind": "otc_confirmation",
        "trade_id": "OTC-TRADE-01",
        "counterparty": "Northwind Energy LLC",
        "side": "buy",
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"side": "hold"}, "side"),
        ({"volume_mwh": "0"}, "volume_mwh"),
        ({"volume_mwh": "-5"}, "volume_mwh"),
        ({"trade_id": "T1"}, "trade_id"),
        ({"counterparty": ""}, "counterparty"),
    ],
)
def test_otc_rules(change: dict[str, Any], field: str) -> None:
    assert field in fields(samples.otc_confirmation(RUN, "OTC-TRADE-03") | change)


# -- physical nominations -------------------------------------------------------------------


def test_gas_nomination_mmbtu_and_naesb_gas_day() -> None:
    rec = ok(samples.gas_nomination(RUN, "GAS-NOM-0001", quantity="10000", price="3.15"))
    # 09:00 Central (CST, UTC-6) on 2026-11-28 to 09:00 the next day
    assert (rec.delivery_start, rec.delivery_end) == (
        "2026-11-28T15:00:00Z",
        "2026-11-29T15:00:00Z",
    )
    assert rec.position_mwh == Decimal("2930.711")  # 2930.7107 half-even
    assert rec.settlement_price == Decimal("10.7482")  # 3.15 / 0.29307107


def test_gas_day_in_summer_is_cdt() -> None:
    rec = ok(samples.gas_nomination(RUN, "GAS-NOM-0002") | {"flow_date": "2026-07-15"})
    assert rec.delivery_start == "2026-07-15T14:00:00Z"


def test_half_even_rounding_of_mmbtu() -> None:
    # 0.5 MMBtu = 0.146535535 MWh -> 0.147 ; exercise the tie rule through the price
    rec = ok(samples.gas_nomination(RUN, "GAS-NOM-0003", quantity="0.5", price="1"))
    assert rec.position_mwh == Decimal("0.147")


def test_power_nomination_is_a_utc_day() -> None:
    rec = ok(
        samples.gas_nomination(RUN, "PWR-NOM-0001", unit="MWh", quantity="240", price="45.5")
        | {"commodity": "power"}
    )
    assert (rec.delivery_start, rec.delivery_end) == (
        "2026-11-28T00:00:00Z",
        "2026-11-29T00:00:00Z",
    )
    assert rec.position_mwh == Decimal(240)
    assert rec.settlement_price == Decimal("45.5")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"commodity": "oil"}, "commodity"),
        ({"unit": "therm"}, "unit"),
        ({"quantity": "0"}, "quantity"),
        ({"price": "0"}, "price"),
        ({"flow_date": "2026-02-29"}, "flow_date"),
        ({"quantity": "400000"}, "quantity"),
    ],
)
def test_nomination_rules(change: dict[str, Any], field: str) -> None:
    assert field in fields(samples.gas_nomination(RUN, "GAS-NOM-0004") | change)


# -- identity, message id, lanes -------------------------------------------------------------


def test_message_id_is_stable_and_content_sensitive() -> None:
    record = samples.otc_confirmation(RUN, "OTC-IDENT-01")
    first = envelope_for("power-east", ok(record))
    assert first.message_id == envelope_for("power-east", ok(dict(record))).message_id
    changed = envelope_for("power-east", ok(record | {"volume_mwh": "401"}))
    revised = envelope_for("power-east", ok(record | {"revision": 2}))
    other_desk = envelope_for("gas-west", ok(record))
    assert (
        len({first.message_id, changed.message_id, revised.message_id, other_desk.message_id}) == 4
    )
    assert first.identity == changed.identity == revised.identity
    assert other_desk.identity != first.identity


def test_message_id_known_value() -> None:
    """Pinned: a change of the derivation would re-send everything already delivered."""
    record = {
        "kind": "otc_confirmation",
        "settlement_run_id": RUN,
        "trade_id": "OTC-IDENT-01",
        "counterparty": "Northwind Energy LLC",
        "side": "sell",
        "delivery_point": "ERCOT-HB-NORTH",
        "delivery_start": "2026-12-01T06:00:00Z",
        "delivery_end": "2026-12-02T06:00:00Z",
        "volume_mwh": "400",
        "fixed_price": "55.25",
        "revision": 1,
        "timestamp_utc": "2026-11-27T18:45:00Z",
    }
    assert envelope_for("power-east", ok(record)).message_id == PINNED_ID


PINNED_ID = "e2a95f1b84b8b9eeaf6adb0ed3bd8601"


def test_lanes() -> None:
    assert lane_for("iso_real_time") == "priority"
    for market in ("iso_day_ahead", "otc_bilateral", "physical_nomination"):
        assert lane_for(market) == "standard"


# -- lane sealing (ETRM_KAFKA_ENCRYPT_PAYLOADS) -----------------------------------------------

SIGNING = ("k1", b"lane-signing-key")
SEALING = ("e1", bytes(range(32)))
OTHER_KEY = ("e9", bytes(32))
HEADERS = {
    "message_id": "a" * 32,
    "desk": "power-east",
    "trader": "t",
    "trace_id": "x",
    "schema_version": "1",
}


@given(value=st.binary(max_size=512))
def test_a_sealed_value_opens_to_itself_and_verifies(value: bytes) -> None:
    headers = dict(HEADERS)
    wire = LaneSealer(SIGNING, PayloadCipher([SEALING])).seal(value, headers)
    if len(value) >= 16:  # (a short value may occur in random bytes by chance)
        assert value not in wire
    assert verify_message(wire, headers, dict([SIGNING])) is None
    assert open_lane_value(wire, headers, PayloadCipher([SEALING])) == value


@given(
    value=st.binary(min_size=1, max_size=256), at=st.integers(min_value=0), bit=st.integers(0, 7)
)
def test_any_flipped_bit_of_a_sealed_value_does_not_open(value: bytes, at: int, bit: int) -> None:
    headers = dict(HEADERS)
    wire = bytearray(LaneSealer(SIGNING, PayloadCipher([SEALING])).seal(value, headers))
    wire[at % len(wire)] ^= 1 << bit
    assert (
        open_lane_value(bytes(wire), headers, PayloadCipher([SEALING]))
        == "payload does not decrypt"
    )


def test_a_sealed_value_is_bound_to_its_message_and_key() -> None:
    headers = dict(HEADERS)
    wire = LaneSealer(SIGNING, PayloadCipher([SEALING])).seal(b'{"price": "55.25"}', headers)
    moved = {**headers, "message_id": "b" * 32}
    assert open_lane_value(wire, moved, PayloadCipher([SEALING])) == "payload does not decrypt"
    assert "not in ETRM_ENCRYPTION_KEYS" in str(
        open_lane_value(wire, headers, PayloadCipher([OTHER_KEY]))
    )
    # the `encryption` header is signed: stripping it (to pass ciphertext off as clear) fails
    stripped = {k: v for k, v in headers.items() if k != "encryption"}
    assert verify_message(wire, stripped, dict([SIGNING])) == "signature does not verify"


def test_a_sealed_value_too_short_to_hold_a_nonce_does_not_open() -> None:
    headers = dict(HEADERS)
    LaneSealer(SIGNING, PayloadCipher([SEALING])).seal(b"{}", headers)
    assert open_lane_value(b"abc", headers, PayloadCipher([SEALING])) == "payload does not decrypt"


def test_without_an_encryption_key_the_value_goes_in_clear() -> None:
    headers = dict(HEADERS)
    assert LaneSealer(SIGNING).seal(b"{}", headers) == b"{}"
    assert "encryption" not in headers
    assert verify_message(b"{}", headers, dict([SIGNING])) is None
    assert open_lane_value(b"{}", headers, None) == b"{}"


# -- the canonical record built without a second validation ------------------------------------

# Numbers at and beyond every bound the four formats and the canonical record have, at every
# scale, with trailing zeros and exponents, as JSON numbers (Decimal) and as strings.
_EDGES = [
    "0",
    "-0",
    "0.000",
    "1",
    "-1",
    "0.0005",
    "0.001",
    "1.0005",
    "3.15",
    "-12.75",
    "42.1250",
    "99999.999",
    "100000",
    "100000.000",
    "100000.001",
    "-100000",
    "-100001",
    "-10000",
    "-10000.01",
    "1000000",
    "1000000.0001",
    "10000000",
    "10000001",
    "1e3",
    "1E-3",
    "2.5e2",
    "1.000000000000000000000000000000000000",
    "0.29307107",
    "341212.71",
    "341212.72",
]
_number = st.one_of(
    st.sampled_from(_EDGES),
    st.decimals(min_value=-200_000, max_value=20_000_000, places=3).map(str),
    st.decimals(min_value=-20_000, max_value=2_000_000, places=7, allow_nan=False),
    st.integers(min_value=-200_000, max_value=20_000_000),
).map(lambda v: Decimal(v) if isinstance(v, str) and len(v) % 3 == 0 else v)
_day = st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)).map(date.isoformat)
_instant = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ").rjust(20, "0")
)


@st.composite
def _source_records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["canonical", "iso", "otc", "nomination"]))
    if kind == "canonical":
        record = samples.canonical(
            RUN,
            "RT-PROP-0001",
            market=draw(st.sampled_from(["iso_real_time", "iso_day_ahead", "otc_bilateral"])),
        )
        record |= {"position_mwh": draw(_number), "settlement_price": draw(_number)}
        record |= {"delivery_start": draw(_instant), "delivery_end": draw(_instant)}
    elif kind == "iso":
        record = samples.iso_award(
            RUN,
            "PJM-DA-PROP1",
            hour_ending=draw(st.integers(min_value=1, max_value=25)),
            iso=draw(st.sampled_from(["PJM", "ERCOT", "CAISO", "MISO", "NYISO", "ISONE", "SPP"])),
            awarded=draw(_number),
            price=draw(_number),
        )
        record["operating_day"] = draw(
            st.one_of(_day, st.sampled_from(["2026-03-08", "2026-11-01"]))
        )
    elif kind == "otc":
        record = samples.otc_confirmation(
            RUN,
            "OTC-PROP-01",
            side=draw(st.sampled_from(["buy", "sell"])),
            volume=draw(_number),
            price=draw(_number),
        )
        record |= {"delivery_start": draw(_instant), "delivery_end": draw(_instant)}
    else:
        record = samples.gas_nomination(
            RUN,
            "GAS-NOM-PROP",
            quantity=draw(_number),
            price=draw(_number),
            unit=draw(st.sampled_from(["MWh", "MMBtu"])),
        )
        record["commodity"] = draw(st.sampled_from(["gas", "power"]))
        record["flow_date"] = draw(_day)
    return record


def _decimals_exactly(record: CanonicalRecord) -> tuple[Any, ...]:
    return (record.position_mwh.as_tuple(), record.settlement_price.as_tuple())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_source_records())
def test_a_record_built_from_its_validated_source_is_the_one_full_validation_makes(
    raw: dict[str, Any], monkeypatch_module: pytest.MonkeyPatch
) -> None:
    """`normalize` builds the canonical record from the fields its source model validated,
    checking only what it computed: the record, or the errors, must be exactly those of
    validating the canonical record whole (as it did before)."""
    built = validate_record(raw, 0)
    with monkeypatch_module.context() as patch:
        patch.setattr(normalize_module, "_built", lambda rec, fields: None)
        validated = validate_record(raw, 0)
    if isinstance(validated, list):
        assert built == validated
        return
    assert isinstance(built, CanonicalRecord), built
    assert built == validated
    assert _decimals_exactly(built) == _decimals_exactly(validated)
    assert built.model_fields_set == validated.model_fields_set
    assert built.to_wire() == validated.to_wire()
    assert envelope_for("desk-a", built) == envelope_for("desk-a", validated)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (samples.iso_award(RUN, "PJM-DA-LATE1") | {"operating_day": "9999-12-31"}, "operating_day"),
        (samples.gas_nomination(RUN, "GAS-NOM-LATE") | {"flow_date": "9999-12-31"}, "flow_date"),
        (
            samples.gas_nomination(RUN, "PWR-NOM-LATE", unit="MWh")
            | {"commodity": "power", "flow_date": "9999-12-31"},
            "flow_date",
        ),
    ],
)
def test_a_day_whose_delivery_period_ends_after_9999_is_refused_by_name(
    raw: dict[str, Any], field: str
) -> None:
    # was an OverflowError out of the date arithmetic: a 500 for one hostile record
    assert fields(raw) == {field}


def test_early_years_keep_four_digits_in_the_delivery_period() -> None:
    # strftime writes year 1 as "1": the award's own period was refused as not a UTC instant
    rec = ok(
        samples.iso_award(RUN, "MISO-DA-0001", iso="MISO", hour_ending=1)
        | {"operating_day": "0001-01-01"}
    )
    assert (rec.delivery_start, rec.delivery_end) == (
        "0001-01-01T05:00:00Z",
        "0001-01-01T06:00:00Z",
    )


@given(
    value=st.one_of(
        st.decimals(allow_nan=False, allow_infinity=False),
        st.sampled_from(["0.000", "-0", "1.500", "1E+3", "1.000000000000000000000"]).map(Decimal),
    )
)
def test_decimal_places_counts_the_places_that_carry_a_digit(value: Decimal) -> None:
    assert decimal_places(value) == len(format(value, "f").partition(".")[2].rstrip("0"))


_header_text = st.text(st.characters(codec="utf-8"), max_size=40)


@given(
    value=st.binary(max_size=600),
    headers=st.fixed_dictionaries(
        dict.fromkeys(SIGNED_HEADERS, _header_text),
        optional=dict.fromkeys(OPTIONAL_SIGNED_HEADERS, _header_text),
    ),
    secret=st.binary(min_size=1, max_size=64),
)
def test_a_signature_is_the_hmac_of_the_value_and_header_digests(
    value: bytes, headers: dict[str, str], secret: bytes
) -> None:
    """The wire format (CONTRACT: HMAC-SHA256 over the SHA-256 of the value and of each signed
    header present, in their fixed order, newline-joined), whatever the signer caches."""
    parts = [value] + [
        f"{name}={headers[name]}".encode()
        for name in (*SIGNED_HEADERS, *OPTIONAL_SIGNED_HEADERS)
        if name in headers
    ]
    signing_input = b"\n".join(hashlib.sha256(p).digest() for p in parts)
    expected = hmac.new(secret, signing_input, hashlib.sha256).hexdigest()
    for _ in range(2):  # the second time from the digests kept for shared headers
        signature = sign_message(value, headers, "k1", secret)
        assert signature == f"kid=k1,v1={expected}"
        assert verify_message(value, headers | {"signature": signature}, {"k1": secret}) is None
    tampered = headers | {"desk": headers["desk"] + "x", "signature": signature}
    assert verify_message(value, tampered, {"k1": secret}) == "signature does not verify"


_ARABIC_2026 = "\u0662\u0660\u0662\u0666"  # Arabic-Indic digits
_FULL_WIDTH_2026 = "\uff12\uff10\uff12\uff16"


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        # digits int() and Decimal() read, which the format's are not
        (CANONICAL | {"timestamp_utc": f"{_ARABIC_2026}-11-27T15:00:00Z"}, "timestamp_utc", "UTC"),
        (
            CANONICAL | {"delivery_start": f"{_FULL_WIDTH_2026}-11-27T14:00:00Z"},
            "delivery_start",
            "UTC",
        ),
        (CANONICAL | {"position_mwh": "\u0662\u0665.\u0665"}, "position_mwh", "finite decimal"),
        (
            samples.iso_award(RUN, "PJM-DA-DIGIT") | {"operating_day": f"{_ARABIC_2026}-11-27"},
            "operating_day",
            "YYYY-MM-DD",
        ),
    ],
)
def test_digits_are_ascii_digits(raw: dict[str, Any], field: str, message: str) -> None:
    # the first two were accepted as they came, and went on to the upstream in that form
    [(pointer, text)] = errors(raw)
    assert pointer == field
    assert message in text


@pytest.mark.parametrize(
    ("raw", "field", "shape"),
    [
        # an offset instead of Z, and fractions of a second: told the shape, not "too long"
        (CANONICAL | {"delivery_start": "2026-11-27T14:00:00+00:00"}, "delivery_start", "UTC"),
        (CANONICAL | {"timestamp_utc": "2026-11-27T15:00:00.000Z"}, "timestamp_utc", "UTC"),
        (
            samples.iso_award(RUN, "PJM-DA-SHAPE") | {"operating_day": "2026-11-27T00:00:00Z"},
            "operating_day",
            "YYYY-MM-DD",
        ),
    ],
)
def test_an_instant_or_a_date_too_long_is_told_its_shape(
    raw: dict[str, Any], field: str, shape: str
) -> None:
    [(pointer, text)] = errors(raw)
    assert pointer == field
    assert shape in text
