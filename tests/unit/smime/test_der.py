"""The DER writer agrees with asn1crypto's encoder, byte for byte."""

from __future__ import annotations

import datetime

import pytest
from asn1crypto import cms, core
from hypothesis import given
from hypothesis import strategies as st

from smime import der


@given(st.integers(min_value=0, max_value=2**200))
def test_integer(n):
    assert der.integer(n) == core.Integer(n).dump()


@given(st.binary(max_size=70000))
def test_octet_string_and_lengths(data):
    assert der.octet_string(data) == core.OctetString(data).dump()


@pytest.mark.parametrize("dotted", ["1.2.840.113549.1.7.1", "1.2.840.113549.1.9.16.1.23", "2.16.840.1.101.3.4.1.46",
                                    "2.25.144082220354151410101936259092983905515"])
def test_oid(dotted):
    assert der.oid(dotted) == core.ObjectIdentifier(dotted).dump()


@pytest.mark.parametrize("when", [datetime.datetime(2026, 11, 25, 10, 0, 5, tzinfo=datetime.UTC),
                                  datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)])
def test_time(when):
    choice = "utc_time" if when.year < 2050 else "generalized_time"
    assert der.time(when) == cms.Time({choice: when}).chosen.dump()


def test_set_of_is_sorted():
    a, b = der.octet_string(b"\x02"), der.octet_string(b"\x01")
    assert der.set_of(a, b) == der.set_of(b, a) == b"\x31\x06" + b + a
