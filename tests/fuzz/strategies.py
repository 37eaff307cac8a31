"""Generators of hostile input shared by the fuzz targets: BER trees, MIME trees, header parameters.

They build structure (a tree of TLVs, a tree of MIME entities), not just random bytes, so that the
examples get past the first length check and into the code that walks what it parsed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hypothesis import strategies as st

from smime import der

# ---------------------------------------------------------------- BER (X.690 §8.1)


@dataclass
class Tlv:
    """One TLV: its identifier octets, then either raw contents (primitive) or children (constructed)."""

    tag: bytes
    contents: bytes = b""
    children: list[Tlv] | None = None
    indefinite: bool = False

    def encode(self) -> bytes:
        """The encoding, built without recursion (trees here nest deeper than Python's recursion limit)."""
        done: dict[int, bytes] = {}
        todo: list[tuple[Tlv, bool]] = [(self, False)]
        while todo:
            node, children_done = todo.pop()
            if node.children is None:
                done[id(node)] = node.tag + der.length(len(node.contents)) + node.contents
            elif not children_done:
                todo.append((node, True))
                todo.extend((c, False) for c in node.children)
            else:
                body = b"".join(done[id(c)] for c in node.children)
                done[id(node)] = (node.tag + b"\x80" + body + b"\x00\x00" if node.indefinite
                                  else node.tag + der.length(len(body)) + body)
        return done[id(self)]

    def walk(self) -> list[tuple[Tlv | None, Tlv]]:
        """(parent, node) of every node, this one first, without recursion."""
        out: list[tuple[Tlv | None, Tlv]] = []
        todo: list[tuple[Tlv | None, Tlv]] = [(None, self)]
        while todo:
            parent, node = todo.pop()
            out.append((parent, node))
            todo.extend((node, c) for c in reversed(node.children or []))
        return out


def parse_der(data: bytes) -> Tlv:
    """A definite-length DER encoding as a tree (our own samples only: they are well formed)."""
    buf = memoryview(data)

    def node_at(pos: int, end: int) -> tuple[Tlv, int]:
        header = der.read_header(buf, pos, end)
        assert header is not None, "sample is not DER"
        tag, start, stop = header
        node = Tlv(bytes(buf[pos:pos + 1]))
        if tag & 0x20:
            node.children = []
            p = start
            while p < stop:
                child, p = node_at(p, stop)
                node.children.append(child)
        else:
            node.contents = bytes(buf[start:stop])
        return node, stop

    return node_at(0, len(data))[0]


OIDS = [der.oid(o)[2:] for o in (der.DATA, der.SIGNED_DATA, der.ENVELOPED_DATA, der.AUTH_ENVELOPED_DATA,
                                  der.CONTENT_TYPE, der.MESSAGE_DIGEST, der.SIGNING_TIME,
                                  "1.2.840.113549.1.1.1", "1.2.840.113549.1.1.7", "1.2.840.113549.1.1.10",
                                  "1.2.840.113549.1.1.11", "1.3.14.3.2.26", "1.2.840.113549.2.5",
                                  "2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.1.2", "2.16.840.1.101.3.4.1.46",
                                  "2.16.840.1.101.3.4.1.6", "1.2.840.10045.4.3.2", "1.2.3.4.5.6.7.8.9")]
_PRIMITIVE_TAGS = [b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x0c", b"\x13", b"\x17", b"\x18",
                   b"\x80", b"\x81", b"\x82", b"\x1f\x81\x00", b"\x00"]
_CONSTRUCTED_TAGS = [b"\x30", b"\x31", b"\xa0", b"\xa1", b"\xa2", b"\xa3", b"\x24", b"\x3f\x81\x00"]

_contents = st.one_of(st.binary(max_size=40), st.sampled_from(OIDS), st.just(b""),
                      st.integers(-(2**70), 2**70).map(lambda n: n.to_bytes(10, "big", signed=True)))
primitive = st.builds(Tlv, st.sampled_from(_PRIMITIVE_TAGS), _contents)


def ber_trees(max_leaves: int = 12) -> st.SearchStrategy[Tlv]:
    return st.recursive(primitive, lambda kids: st.builds(
        Tlv, st.sampled_from(_CONSTRUCTED_TAGS), st.just(b""), st.lists(kids, max_size=4), st.booleans()),
        max_leaves=max_leaves)


@st.composite
def mutated_ber(draw: st.DrawFn, sample: bytes) -> bytes:
    """`sample` with one to three structural changes: a subtree replaced, deleted, doubled, wrapped in
    many levels, turned into indefinite length, retagged, or its contents changed."""
    root = parse_der(sample)
    for _ in range(draw(st.integers(1, 3))):
        nodes = root.walk()
        parent, node = nodes[draw(st.integers(0, len(nodes) - 1))]
        op = draw(st.sampled_from(["replace", "delete", "double", "wrap", "indefinite", "retag", "contents",
                                   "oid", "chunk"]))
        if op == "replace":
            new = draw(ber_trees())
            node.tag, node.contents, node.children, node.indefinite = new.tag, new.contents, new.children, \
                new.indefinite
        elif op in ("delete", "double") and parent is not None and parent.children is not None:
            i = next(i for i, c in enumerate(parent.children) if c is node)
            if op == "delete":
                del parent.children[i]
            else:
                parent.children.insert(i, Tlv(node.tag, node.contents, None if node.children is None
                                              else list(node.children), node.indefinite))
        elif op == "wrap":
            levels = draw(st.sampled_from([1, 2, 10, 70, 400]))
            inner = Tlv(node.tag, node.contents, node.children, node.indefinite)
            indefinite = draw(st.booleans())
            for _ in range(levels):
                inner = Tlv(draw(st.sampled_from([b"\x30", b"\xa0", b"\x24"])), children=[inner],
                            indefinite=indefinite)
            node.tag, node.contents, node.children, node.indefinite = inner.tag, b"", inner.children, indefinite
        elif op == "indefinite" and node.children is not None:
            node.indefinite = True
        elif op == "retag":
            tags = _CONSTRUCTED_TAGS if node.children is not None else _PRIMITIVE_TAGS
            node.tag = draw(st.sampled_from(tags))
        elif op == "contents" and node.children is None:
            node.contents = draw(_contents)
        elif op == "oid" and node.children is None and node.tag == b"\x06":
            node.contents = draw(st.sampled_from(OIDS))
        elif op == "chunk" and node.children is None and node.tag == b"\x04":
            # BER's constructed OCTET STRING (X.690 §8.7.3), in chunks of a drawn size
            size = draw(st.integers(1, 64))
            data = node.contents
            node.tag, node.contents = b"\x24", b""
            node.children = [Tlv(b"\x04", data[i:i + size]) for i in range(0, len(data), size)]
            node.indefinite = draw(st.booleans())
    return root.encode()


# ---------------------------------------------------------------- MIME (RFC 2045, 2046, 2231, 8551)

_CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "utf-16", "idna", "punycode", "rot13", "utf-7", "x-unknown", ""]
_CTES = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "BASE64", "bogus", ""]
_TYPES = ["text/plain", "text/html", "application/octet-stream", "application/pkcs7-mime",
          "application/x-pkcs7-mime", "application/pkcs7-signature", "message/rfc822", "message/global",
          "message/delivery-status", "image/png", "", "text", "/", "application/pkcs7-mime/extra"]
_SMIME_TYPES = ["signed-data", "enveloped-data", "authEnveloped-data", "certs-only", "compressed-data", "x", ""]
_boundary_text = st.text(alphabet=st.sampled_from("abcXYZ0129'()+_,-./:=? \"\\é\t"), min_size=0, max_size=20)
_token = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=";\"\\"),
                 max_size=12)
_header_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@st.composite
def params(draw: st.DrawFn) -> str:
    """Content-Type parameters, plain, quoted and RFC 2231 (charset, continuations)."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["name", "charset", "smime-type", "protocol", "micalg", "x", "boundary"]))
        kind = draw(st.sampled_from(["plain", "quoted", "2231", "2231-cont"]))
        value = draw(_token)
        if kind == "plain":
            out.append(f"{name}={value}")
        elif kind == "quoted":
            out.append(f'{name}="{draw(_header_text)}"')
        elif kind == "2231":
            out.append(f"{name}*={draw(st.sampled_from(_CHARSETS))}'{draw(st.sampled_from(['', 'fr']))}'"
                       f"{draw(st.sampled_from(['%ff', '%C3%A9', '%', '%zz', '%00%d8', value]))}")
        else:
            out.append(f"{name}*0*={draw(st.sampled_from(_CHARSETS))}''{value}; {name}*1={value}")
    return "".join(f"; {p}" for p in out)


@dataclass
class Entity:
    head: list[bytes] = field(default_factory=list)
    body: bytes = b""

    def encode(self, eol: bytes) -> bytes:
        return b"".join(h + eol for h in self.head) + eol + self.body


def _cms_body(samples: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(sorted(samples.values())).map(lambda d: base64.encodebytes(d)),
        st.binary(max_size=200).map(base64.encodebytes),
        st.binary(max_size=200),
    )


def mime_entities(samples: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """MIME entities of every shape the gateway may receive: S/MIME and not, well and badly formed."""
    eol_s = st.sampled_from([b"\r\n", b"\n"])

    @st.composite
    def leaf(draw: st.DrawFn) -> bytes:
        mime_type = draw(st.sampled_from(_TYPES))
        extra = draw(params())
        if mime_type.endswith("pkcs7-mime") and draw(st.booleans()):
            extra += f"; smime-type={draw(st.sampled_from(_SMIME_TYPES))}"
        head = [f"Content-Type: {mime_type}{extra}".encode("utf-8", "surrogateescape")]
        cte = draw(st.sampled_from(_CTES))
        if cte:
            head.append(b"Content-Transfer-Encoding: " + cte.encode())
        if draw(st.booleans()):
            head.append(b"X-Folded: a\r\n\tb" if draw(st.booleans()) else draw(st.binary(max_size=30)))
        body = draw(st.one_of(_cms_body(samples), st.binary(max_size=200),
                              _header_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
        return Entity(head, body).encode(draw(eol_s))

    def multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
        @st.composite
        def build(draw: st.DrawFn) -> bytes:
            eol = draw(eol_s)
            boundary = draw(_boundary_text)
            subtype = draw(st.sampled_from(["mixed", "signed", "alternative", "digest", "related", "report"]))
            extra = draw(params())
            if subtype == "signed":
                extra += draw(st.sampled_from(['; protocol="application/pkcs7-signature"; micalg=sha-256', "",
                                               "; protocol=application/pgp-signature"]))
            quoted = draw(st.booleans())
            shown = f'"{boundary}"' if quoted else boundary
            head = [f"Content-Type: multipart/{subtype}; boundary={shown}{extra}".encode()]
            b = boundary.encode("utf-8")
            parts = draw(st.lists(children, max_size=4))
            body = draw(st.sampled_from([b"", b"preamble" + eol]))
            body += b"".join(b"--" + b + eol + p + eol for p in parts)
            if draw(st.booleans()):
                body += b"--" + b + b"--" + eol + draw(st.sampled_from([b"", b"epilogue"]))
            return Entity(head, body).encode(eol)
        return build()

    def message_rfc822(inner: bytes) -> bytes:
        return b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + inner

    tree = st.recursive(leaf(), lambda kids: st.one_of(multipart(kids), kids.map(message_rfc822)),
                        max_leaves=8)
    return tree


def message_of(entity: bytes) -> bytes:
    return (b"From: Jeanne EXEMPLE <jeanne.exemple@dev.mssante.test>\r\nTo: paul.testeur@dev.mssante.test\r\n"
            b"Subject: fuzz\r\nMIME-Version: 1.0\r\n" + entity)
