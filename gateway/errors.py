"""Errors of the gateway. Those that reach an SMTP client know their reply.

The reply text (what the client reads) is kept apart from the cause (what the log says).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of the gateway's own errors."""


class HoldMessage(GatewayError):
    """Park this message in state `hold` (DESIGN.md) until what it waits for is back (a CPS card, an operator)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SmtpReplyError(GatewayError):
    """An error answered in the SMTP session: code, enhanced status code (RFC 3463), a sentence."""

    code = 451
    enhanced = "4.3.0"
    text = "Temporary local problem, please try again later"

    def __init__(self, text: str | None = None, *, cause: str | None = None) -> None:
        if text is not None:
            self.text = text
        self.cause = cause
        super().__init__(cause or self.text)

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"
