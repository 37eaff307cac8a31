"""The peer's client certificate against the operator DN of the trust-space list (mssante.md §1.3,
`DNCertificatOperateur`; issue 6, inbound): gateway B accepts mail for a sender domain only from the
certificate the list names for that domain, when it names one. The list here gives A's domain a DN that
is not A's certificate: A's relayed message is refused (`550 5.7.1`) and ends in a failure DSN in alice's
inbox. A peer talking to B's port 25 with A's certificate shows the other cases: the right DN written
the other way round and in other case is accepted, a domain listed without a DN is accepted, another
operator's DN is refused.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.devdirectory import operator_dn
from tests.integration.gateway_support import A, TwoGateways, dev_pkis, inbox_messages, short_tmpdir, two_gateways

D, E, F = "d.mssante.test", "e.mssante.test", "f.mssante.test"
OTHER_OPERATOR = "CN=gw.a.mssante.test,OU=399900000999999,O=AUTRE OPERATEUR TEST,ST=Paris (75),C=FR"


def reversed_and_recased(dn: str) -> str:
    """The same DN as OpenSSL prints it (C first) with other case and spacing."""
    parts = [part.split("=", 1) for part in reversed(dn.split(","))]
    return ", ".join(f"{kind}={value.swapcase().replace(' ', '  ')}" for kind, value in parts)


@pytest.fixture(scope="module")
def world(dovecot_binary: Path) -> Iterator[TwoGateways]:
    root = short_tmpdir()
    pki_a, pki_b = dev_pkis(root)
    right = operator_dn(pki_a.tls_server_cert)
    gws = two_gateways(root, pki_a, pki_b, operators={A: OTHER_OPERATOR, D: OTHER_OPERATOR, E: None,
                                                      F: reversed_and_recased(right)})
    gws.start()
    try:
        yield gws
    finally:
        gws.stop()
        shutil.rmtree(root, ignore_errors=True)


def as_gateway_a(world: TwoGateways) -> smtplib.SMTP:
    """B's port 25, with A's gateway certificate as TLS client certificate (what A's relay presents)."""
    ctx = ssl.create_default_context(cafile=str(world.root / "anchors.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(world.pki_a.tls_server_chain, world.pki_a.tls_server_key)
    c = smtplib.SMTP("127.0.0.1", world.b.inbound_port, timeout=30)
    c.starttls(context=ctx)
    c.ehlo(f"gw.{A}")
    return c


def test_the_listed_operator_dn_decides(world: TwoGateways) -> None:
    with as_gateway_a(world) as c:
        code, text = c.mail(f"someone@{A}")
        assert (code, text[:5]) == (550, b"5.7.1"), text
        assert b"not the operator certificate" in text and A.encode() in text
        c.rset()
        code, text = c.mail(f"someone@{D}")
        assert (code, text[:5]) == (550, b"5.7.1"), text
        c.rset()
        assert c.mail(f"someone@{F}")[0] == 250  # A's own DN, written C first, in other case and spacing
        c.rset()
        assert c.mail(f"someone@{E}")[0] == 250  # the list gives no DN for E: the trust anchors decide alone


def test_a_relayed_message_from_the_wrong_operator_ends_in_a_dsn(world: TwoGateways) -> None:
    mail = (f"From: {world.alice}\r\nTo: {world.bob}\r\nSubject: Refuse par B\r\n\r\nBonjour.\r\n").encode()
    with world.a.smtp(world.alice) as s:
        assert s.sendmail(world.alice, [world.bob], mail) == {}
    deadline = time.monotonic() + 60
    messages: list[bytes] = []
    with world.a.imap(world.alice) as c:
        while not messages and time.monotonic() < deadline:
            messages = inbox_messages(c)
            time.sleep(0.2)
    [dsn] = messages
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status").as_bytes()
    assert b"Action: failed" in status and b"Status: 5.7.1" in status, status
    assert b"is not the operator certificate" in b" ".join(status.split())  # B's reply, unfolded
    with world.b.imap(world.bob) as c:
        c.select("INBOX")
        assert c.search(None, "ALL")[1][0] == b""
