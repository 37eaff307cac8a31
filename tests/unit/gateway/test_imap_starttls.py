"""The IMAP relay's clear-text watch: what a client sends with STARTTLS is dropped, everything else passes."""

from __future__ import annotations

from gateway.imap_starttls import Phase, StartTlsGuard

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def phase(guard: StartTlsGuard) -> Phase:
    """The phase now (read through a call: each read is a new value, not one narrowed by the assert before)."""
    return guard.phase


def test_bytes_after_starttls_in_the_same_read_are_dropped() -> None:
    guard = StartTlsGuard()
    assert guard.from_client(b"a CAPABILITY\r\nb STARTTLS\r\nc LOGIN u p\r\n") == b"a CAPABILITY\r\nb STARTTLS\r\n"
    assert phase(guard) is Phase.STARTING_TLS and guard.discarded == len(b"c LOGIN u p\r\n")
    assert guard.from_client(b"d SELECT INBOX\r\n") == b""  # a later read, still before the answer
    guard.from_server(b"* CAPABILITY IMAP4rev1\r\na OK done\r\nb OK Begin TLS negotiation now.\r\n")
    assert phase(guard) is Phase.TLS
    assert guard.from_client(CLIENT_HELLO + b"b STARTTLS\r\n") == CLIENT_HELLO + b"b STARTTLS\r\n"


def test_lines_and_replies_split_across_reads() -> None:
    guard = StartTlsGuard()
    assert guard.from_client(b"x1 NOOP\r\nx2 STA") == b"x1 NOOP\r\nx2 STA"
    assert guard.from_client(b"rttls\r\ninjected") == b"rttls\r\n"
    guard.from_server(b"x1 OK NOOP\r\nx2 O")
    assert phase(guard) is Phase.STARTING_TLS
    guard.from_server(b"K Begin TLS\r\n")
    assert phase(guard) is Phase.TLS


def test_a_refused_starttls_returns_to_clear_text() -> None:
    guard = StartTlsGuard()
    guard.from_client(b"t STARTTLS\r\n")
    guard.from_server(b"* OK [ALERT] something\r\nt BAD TLS is not available\r\n")
    assert phase(guard) is Phase.CLEAR
    assert guard.from_client(b"u CAPABILITY\r\n") == b"u CAPABILITY\r\n"


def test_starttls_inside_a_literal_or_a_long_line_is_not_a_command() -> None:
    guard = StartTlsGuard()
    literal = b"a LOGIN {14}\r\nb STARTTLS\r\nx {3+}\r\nabc\r\n"  # the literal holds a fake STARTTLS line
    assert guard.from_client(literal) == literal and phase(guard) is Phase.CLEAR
    long_line = b"c NOOP " + b"q" * 5000 + b"\r\n"
    assert guard.from_client(long_line) == long_line and phase(guard) is Phase.CLEAR
    assert guard.from_client(b"d starttls\r\n") == b"d starttls\r\n" and phase(guard) is Phase.STARTING_TLS


def test_untagged_lines_do_not_end_the_wait() -> None:
    guard = StartTlsGuard()
    guard.from_client(b"s STARTTLS\r\n")
    guard.from_server(b"* OK still here\r\nss OK not this tag\r\n")
    assert phase(guard) is Phase.STARTING_TLS
