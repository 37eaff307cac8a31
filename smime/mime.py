"""The MIME side of S/MIME (RFC 8551 §3): canonical form, multipart/signed and application/pkcs7-mime.

Work is done on bytes, not on a re-serialised `email.message`, because a signature covers exact bytes:
parsing and printing a part again could refold a header and break it. The email package is used only
to re-encode 8-bit leaves before signing, when the bytes must change anyway (RFC 8551 §3.1.1).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import email.policy
import email.utils
import functools
import io
import quopri
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.generator import BytesGenerator
from types import MappingProxyType

from smime.errors import LimitExceeded, MalformedMessage
from smime.limits import DEFAULT_LIMITS, ParseLimits

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 §2.1.1

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_BARE_EOL = re.compile(rb"\r\n|\r|\n")
_CONTENT_FIELD = re.compile(rb"(?i)^(content-[a-z0-9-]*|mime-version)\s*:")


def to_crlf(data: bytes) -> bytes:
    """Every line ending as CRLF: the canonical form of RFC 8551 §3.1.1 (bare CR and LF included)."""
    crlf = data.count(CRLF)
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data  # already canonical: no copy
    return _BARE_EOL.sub(CRLF, data)


def split_header_body(data: bytes) -> tuple[bytes, bytes]:
    """The header block (with its final line ending) and the body, split at the first empty line."""
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2:] if data.startswith(b"\r\n") else data[1:]
    m = _HEADER_END.search(data)
    if m is None:
        return data, b""
    first_eol = data.index(b"\n", m.start()) + 1
    return data[:first_eol], data[m.end():]


def header_fields(block: bytes) -> list[bytes]:
    """The raw fields of a header block, continuation lines kept with their field (RFC 5322 §2.2.3)."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line.strip():
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    raw = field.split(b":", 1)[1] if b":" in field else b""
    return " ".join(raw.decode("utf-8", "replace").split())


def get_header(block: bytes, name: str) -> str | None:
    """The unfolded value of the first field called `name`, None when absent."""
    name = name.lower()
    for field in header_fields(block):
        if field_name(field) == name:
            return field_value(field)
    return None


@dataclass(frozen=True, slots=True)
class ContentType:
    """A parsed Content-Type (RFC 2045 §5.1): lower-case type and its parameters (read-only: it may be shared)."""

    mime_type: str
    params: Mapping[str, str]

    def param(self, name: str) -> str | None:
        return self.params.get(name.lower())


_LINE_BREAK = re.compile(r"\r?\n")


def boundary_bytes(boundary: str) -> bytes:
    """A boundary parameter back as the bytes it came as (undecodable bytes were kept as surrogates)."""
    try:
        return boundary.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from an RFC 2231 value in UTF-16, say: matches nothing real
        return boundary.encode("utf-8", "surrogatepass")


def content_type(block: bytes) -> ContentType:
    """The Content-Type of an entity's header block; text/plain when absent (RFC 2045 §5.2).

    The field is unfolded (RFC 5322 §2.2.3) but its white space kept: a quoted boundary may hold a tab.
    Opening one message asks for the Content-Type of the same few blocks a dozen times, and the email
    package's parameter parsing is most of the cost: a small block's answer is kept (`_MEMO_BYTES`).
    """
    if type(block) is bytes and len(block) <= _MEMO_BYTES:
        return _remembered_content_type(block)
    return _parse_content_type(block)


_MEMO_BYTES = 4096  # with 256 blocks kept, at most 1 MiB held


@functools.lru_cache(maxsize=256)
def _remembered_content_type(block: bytes) -> ContentType:
    return _parse_content_type(block)


def _parse_content_type(block: bytes) -> ContentType:
    field = next((f for f in header_fields(block) if field_name(f) == "content-type"), None)
    name_end = field.find(b":") if field is not None else -1
    if field is None or name_end < 0:  # absent, or a line without a colon: syntactically invalid (§5.2 again)
        return ContentType("text/plain", MappingProxyType({}))
    value = _LINE_BREAK.sub("", field[name_end + 1:].decode("utf-8", "surrogateescape")).strip()
    msg = email.message.Message()
    msg["Content-Type"] = value
    params: dict[str, str] = {}
    try:
        found = msg.get_params(failobj=[])[1:]
    except (TypeError, ValueError, IndexError):  # RFC 2231 continuations the email package cannot put together
        found = _plain_params(value)
    for key, val in found:
        params.setdefault(key.lower(), _param_value(val))  # the first of a repeated parameter, as email.message
    try:
        mime_type = msg.get_content_type()
    except UnicodeError:  # bytes outside ASCII in the type itself: invalid, so text/plain (RFC 2045 §5.2)
        mime_type = "text/plain"
    return ContentType(mime_type, MappingProxyType(params))


_PARAM_SEPARATOR = re.compile(r';(?=(?:[^"]*"[^"]*")*[^"]*$)')


def _plain_params(value: str) -> list[tuple[str, str]]:
    """Parameters `name=value` of a header value, without RFC 2231 decoding (quotes removed)."""
    out = []
    for item in _PARAM_SEPARATOR.split(value)[1:]:
        name, sep, val = item.partition("=")
        if sep:
            out.append((name.strip(), email.utils.unquote(val.strip())))
    return out


def _param_value(value: str | tuple[str, str, str]) -> str:
    """An RFC 2231 parameter value decoded with its charset; one naming a codec that cannot decode
    leniently (`idna`, say) is kept as sent, never an exception."""
    try:
        return email.utils.collapse_rfc2231_value(value)
    except (UnicodeError, LookupError):
        return email.utils.unquote(value[2] if isinstance(value, tuple) else value)


# Where the email package's feed parser ends a header block: at the first line that is neither a field
# ("name:") nor a continuation (email.feedparser.headerRE); an empty line there is consumed with it.
_NOT_A_HEADER_LINE = re.compile(rb"(?m)^(?![\x21-\x39\x3b-\x7e]*:|[ \t])")


def check_structure(entity: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> None:
    """Raise `LimitExceeded` when a MIME tree nests deeper or holds more entities than `limits` allow.

    Multipart bodies are cut at their delimiters (RFC 2046 §5.1.1), message/* bodies entered (§5.2.1),
    parts of a multipart/digest without a Content-Type taken as message/rfc822 (§5.1.5), the way the
    email package reads them; by offsets into one CRLF copy: no recursion, nothing decoded. The email
    package recurses once per level and builds an object per part, so this runs before it does.
    """
    data = to_crlf(entity)
    stack = [(0, len(data), 1, False)]
    parts = 0
    while stack:
        start, end, depth, in_digest = stack.pop()
        parts += 1
        if parts > limits.max_mime_parts:
            raise LimitExceeded("MIME parts in one message", parts, limits.max_mime_parts)
        if depth > limits.max_mime_depth:
            raise LimitExceeded("MIME nesting depth", depth, limits.max_mime_depth)
        m = _NOT_A_HEADER_LINE.search(data, start, end)
        head_end = m.start() if m else end
        body = head_end + 2 if data.startswith(CRLF, head_end, end) else head_end
        block = data[start:head_end]
        if in_digest and get_header(block, "content-type") is None:
            mime_type, boundary = "message/rfc822", None
        else:
            ctype = content_type(block)
            mime_type, boundary = ctype.mime_type, ctype.param("boundary")
        if mime_type == "message/delivery-status":  # a list of header blocks, one entity each (RFC 3464 §2.1)
            parts += data.count(b"\r\n\r\n", body, end) + 1
            stack.append((end, end, depth + 1, False))  # their level, counted as one more part
            continue
        if mime_type.startswith("message/"):
            stack.append((body, end, depth + 1, False))
            continue
        if not mime_type.startswith("multipart/") or boundary is None:
            continue
        boundary = boundary.rstrip()  # an empty boundary still cuts parts at "--" lines, as the email package does
        digest = mime_type == "multipart/digest"
        previous: int | None = None
        for line_start, line_end, closing in _delimiter_lines(data, b"--" + boundary_bytes(boundary), body, end):
            if previous is not None:
                stop = line_start - 2 if data.startswith(CRLF, line_start - 2) else line_start
                stack.append((previous, max(previous, stop), depth + 1, digest))
            if closing:
                previous = None
                break
            previous = line_end
        if previous is not None:  # no closing delimiter: the last part runs to the end (as the email package reads it)
            stack.append((previous, end, depth + 1, digest))


def _delimiter_lines(data: bytes, dash_boundary: bytes, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(line start, end after its CRLF, closing?) of each delimiter line in data[start:end] (RFC 2046 §5.1.1):
    the boundary after two hyphens at the start of a line, `--` if it closes, white space, then the line end.
    bytes.find, not a MULTILINE regex: a 25 MB body is searched ten times faster."""
    needle = CRLF + dash_boundary
    at = start if data.startswith(dash_boundary, start, end) else data.find(needle, start, end)
    while at >= 0:
        line = at if at == start and data.startswith(dash_boundary, start, end) else at + 2
        i = line + len(dash_boundary)
        closing = data.startswith(b"--", i, end)
        for j in ((i + 2, i) if closing else (i,)):
            k = j
            while k < end and data[k] in b" \t":
                k += 1
            if k == end or data.startswith(CRLF, k, end):
                yield line, min(k + 2, end), j != i
                break
        at = data.find(needle, i, end)


def split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """Split an RFC 5322 message into its outer fields and the MIME entity that S/MIME protects.

    The entity is the Content-* fields with the body (RFC 8551 §3.1); From, To, Subject and the
    rest stay outside, as in every S/MIME agent. MIME-Version stays outside too.
    """
    block, body = split_header_body(message)
    outer: list[bytes] = []
    inner: list[bytes] = []
    for field in header_fields(block):
        name = field_name(field)
        if name.startswith("content-"):
            inner.append(field)
        elif name != "mime-version":
            outer.append(field)
    if not inner:
        inner = [b"Content-Type: text/plain; charset=us-ascii\r\n"]
    return outer, b"".join([to_crlf(b"".join(inner)), CRLF, body])


def join_message(outer: list[bytes], entity: bytes) -> bytes:
    """An RFC 5322 message from outer fields and a MIME entity (the reverse of split_message)."""
    fields = [to_crlf(f if f.endswith((b"\n", b"\r")) else f + CRLF) for f in outer]
    return b"".join([*fields, b"MIME-Version: 1.0\r\n", entity])


_EIGHT_BIT_CTE = re.compile(rb"(?im)^content-transfer-encoding:[ \t]*(8bit|binary)")


# What hops rewrite (RFC 8551 §3.1.1, §3.1.3): trailing white space is stripped, "From " at the start of a
# line becomes ">From " in mbox stores. Quoted-printable protects both. Plain substring tests: a regex
# over a 1 MB body costs tens of milliseconds.
# The end of a line followed by LF that has white space before its line ending (CRLF or bare LF).
_TRAILING_SPACE = (b" \r", b"\t\r", b" ", b"\t")


def _needs_reencoding(entity: bytes) -> bool:
    if not entity.isascii() or b"\0" in entity:
        return True
    if entity.startswith(b"From ") or b"\nFrom " in entity:
        return True
    lower = entity.lower()
    if (b"8bit" in lower or b"binary" in lower) and _EIGHT_BIT_CTE.search(entity):
        return True
    # One split for both line checks: a line over MAX_LINE with its CRLF (the last line has none), and white space
    # before a line end (endswith per line is a third of the four substring searches it replaces).
    *ended, last = entity.split(b"\n")
    return (max(map(len, ended), default=0) > MAX_LINE + 1 or len(last) > MAX_LINE + 2
            or any(line.endswith(_TRAILING_SPACE) for line in ended))


def canonicalize(entity: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> bytes:
    """The canonical, 7-bit form of a MIME entity, ready to be signed (RFC 8551 §3.1.1, §3.1.3).

    CRLF line endings; leaves that are 8-bit, over-long, or carry trailing white space or "From " lines
    re-encoded (text as quoted-printable, the rest as base64) so that no later hop needs to touch the
    signed bytes. Any other entity only gets CRLF. An entity past `limits` raises `LimitExceeded`
    before the email package parses it.
    """
    if not _needs_reencoding(entity):
        return to_crlf(entity)
    check_structure(entity, limits)
    try:
        return _reencode(entity)
    except (TypeError, ValueError, LookupError, IndexError, AttributeError) as exc:
        # The email package fails on some malformed headers (RFC 2231 continuations mixed with an extended
        # value, say) instead of recording a defect; the client must fix the message.
        raise MalformedMessage(f"the message cannot be re-encoded for signing: {type(exc).__name__}: {exc}") from None


def _reencode(entity: bytes) -> bytes:
    policy = email.policy.compat32.clone(linesep="\r\n")
    msg = email.message_from_bytes(entity, policy=policy)
    for part in msg.walk():
        if part.is_multipart():
            continue
        cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
        if cte in ("base64", "quoted-printable"):
            continue
        raw = part.get_payload(decode=True)
        payload = raw if isinstance(raw, bytes) else b""
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            text = payload.replace(b"\r\n", b"\n")
            encoded = re.sub(rb"(?m)^From ", b"=46rom ", quopri.encodestring(text))
            part.set_payload(encoded.decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(payload).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=policy).flatten(msg)
    return to_crlf(out.getvalue())


_BASE64_LINE = re.compile(rb".{1,76}", re.DOTALL)


def base64_pieces(data: bytes) -> list[bytes]:
    """Base64 in 76-character CRLF lines (RFC 2045 §6.8), as pieces for one final join.

    One piece: the whole input encoded at once, then cut into lines by a regex, both in C. (`encodebytes`
    calls b2a_base64 once per 57-byte line from a Python loop: a third slower for 20 KB.)
    """
    if not data:
        return []
    return [CRLF.join(_BASE64_LINE.findall(binascii.b2a_base64(data, newline=False))) + CRLF]


def base64_lines(data: bytes) -> bytes:
    return b"".join(base64_pieces(data))


def new_boundary(content: bytes) -> str:
    while True:
        boundary = "----=_smime_" + secrets.token_hex(12)
        if boundary.encode() not in content:
            return boundary


def build_multipart_signed(content: bytes, signature: bytes, micalg: str) -> bytes:
    """The multipart/signed entity of RFC 1847 §2.1 / RFC 8551 §3.5.3 around a canonical content part."""
    boundary = new_boundary(content)
    head = (f'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg={micalg};\r\n'
            f' boundary="{boundary}"\r\n\r\n'
            "This is an S/MIME signed message\r\n\r\n").encode()
    sig_head = (b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
                b"Content-Transfer-Encoding: base64\r\n"
                b'Content-Disposition: attachment; filename="smime.p7s"\r\n'
                b"Content-Description: S/MIME Cryptographic Signature\r\n\r\n")
    b = boundary.encode()
    return b"".join([head, b"--", b, CRLF, content, CRLF, b"--", b, CRLF, sig_head, base64_lines(signature), CRLF,
                     b"--", b, b"--", CRLF])


def build_pkcs7_mime(der: bytes, smime_type: str) -> bytes:
    """An application/pkcs7-mime entity (RFC 8551 §3.2): enveloped-data, signed-data, authEnveloped-data."""
    name = "smime.p7m"
    head = (f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="{name}"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n').encode()
    return b"".join([head, *base64_pieces(der)])


@dataclass(frozen=True, slots=True)
class SignedParts:
    """The two parts of a multipart/signed entity, the content exactly as it came."""

    content: bytes
    signature: bytes
    micalg: str | None
    protocol: str | None


def split_multipart_signed(entity: bytes) -> SignedParts:
    """Cut a multipart/signed entity into its content bytes and its signature (RFC 1847 §2.1, RFC 2046 §5.1.1).

    The line break before each delimiter belongs to the delimiter, not to the part before it.
    """
    block, body = split_header_body(entity)
    ctype = content_type(block)
    boundary = ctype.param("boundary")
    if ctype.mime_type != "multipart/signed" or not boundary:
        raise MalformedMessage(f"expected multipart/signed with a boundary, got {ctype.mime_type}")
    protocol = (ctype.param("protocol") or "application/pkcs7-signature").lower()
    if protocol not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
        raise MalformedMessage(f"multipart/signed with protocol {protocol} is not S/MIME (RFC 8551 §3.5.3)")
    marks = list(signed_delimiters(body, b"--" + boundary_bytes(boundary)))
    closing = next((i for i, m in enumerate(marks) if m[2]), None)
    if closing is None:
        raise MalformedMessage("multipart/signed has no closing delimiter")
    if closing != 2:
        raise MalformedMessage(f"multipart/signed must have exactly two parts, found {closing}")
    parts = []
    for start, end in ((marks[0][1], marks[1][0]), (marks[1][1], marks[2][0])):
        part = body[start:end]
        if part.endswith(b"\r\n"):
            part = part[:-2]
        elif part.endswith(b"\n"):
            part = part[:-1]
        parts.append(part)
    sig_block, sig_body = split_header_body(parts[1])
    sig_type = content_type(sig_block).mime_type
    if sig_type not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
        raise MalformedMessage(f"second part of multipart/signed is {sig_type}, not application/pkcs7-signature")
    return SignedParts(parts[0], decode_body(sig_block, sig_body), ctype.param("micalg"), ctype.param("protocol"))


def signed_delimiters(body: bytes, dash_boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closing?) of each delimiter line of a multipart/signed body as it came (RFC 2046 §5.1.1):
    `dash_boundary` at the start of a line, `--` if it closes, spaces or tabs, then CRLF, a bare LF or the end.

    What the regex `(?m)^--boundary(--)?[ \\t]*(?:\\r?\\n|\\Z)` finds, by bytes.find: each message has its own
    boundary, so that regex was compiled anew for every message opened (60 us, more than the search). Only the
    boundary at a line start is visited (LF + boundary is what is searched for), so a body full of the boundary
    elsewhere in its lines costs no Python loop."""
    end = len(body)
    needle = b"\n" + dash_boundary
    line = 0 if body.startswith(dash_boundary) else body.find(needle) + 1 or -1
    while line >= 0:
        i = line + len(dash_boundary)
        closing = body.startswith(b"--", i)
        k = i + 2 if closing else i
        while k < end and body[k] in (0x20, 0x09):
            k += 1
        eol = 0 if k == end else 2 if body.startswith(CRLF, k) else 1 if body[k] == 0x0A else -1
        search_from = line
        if eol >= 0:
            yield line, k + eol, closing
            if eol == 0:
                return
            search_from = k + eol - 1  # the LF that ends this delimiter may begin the next line's
        line = body.find(needle, search_from) + 1 or -1


def decode_body(block: bytes, body: bytes) -> bytes:
    """The body of a part with its Content-Transfer-Encoding undone (base64, quoted-printable, or none)."""
    cte = (get_header(block, "content-transfer-encoding") or "7bit").lower()
    if cte == "base64":
        try:
            return binascii.a2b_base64(body)  # line breaks and other non-alphabet bytes are skipped (RFC 2045 §6.8)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage(f"base64 body does not decode: {exc}") from None
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body
