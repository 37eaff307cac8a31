"""A readable description of the S/MIME layers of a message, for sysadmins (`mssgw smime inspect`).

Only what can be read without a key: MIME types, CMS types, algorithms, signers, certificates, recipients.
An encrypted layer hides what is inside; the CLI decrypts and inspects again when given a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import cms

from smime.algorithms import read_oaep_parameters
from smime.cms import describe_identifier, load_content_info, parse_errors_as_malformed
from smime.errors import SmimeError
from smime.mime import (
    content_type,
    decode_body,
    split_header_body,
    split_multipart_signed,
)


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer: its MIME and CMS type, facts as (label, value) pairs, and the inner entity when readable."""

    mime_type: str
    cms_type: str | None
    facts: tuple[tuple[str, str], ...]
    inner: bytes | None

    def lines(self) -> list[str]:
        head = self.mime_type + (f" ({self.cms_type})" if self.cms_type else "")
        return [head, *(f"  {label}: {value}" for label, value in self.facts)]


def _signed_facts(signed: cms.SignedData) -> list[tuple[str, str]]:
    facts = [("digest algorithms", ", ".join(str(d["algorithm"].native) for d in signed["digest_algorithms"]))]
    facts.append(("encapsulated content", "present" if signed["encap_content_info"]["content"].native is not None
                  else "absent (detached)"))
    for i, si in enumerate(signed["signer_infos"]):
        attrs = {a["type"].native: a["values"][0].native for a in si["signed_attrs"]} \
            if si["signed_attrs"].native is not None else {}
        facts.append((f"signer {i}", describe_identifier(si["sid"])))
        facts.append((f"signer {i} algorithms",
                      f"{si['digest_algorithm']['algorithm'].native} / {si['signature_algorithm']['algorithm'].native}"))
        facts.append((f"signer {i} signed attributes", ", ".join(str(k) for k in attrs) or "none"))
        if "signing_time" in attrs:
            facts.append((f"signer {i} signing time", str(attrs["signing_time"])))
    if signed["certificates"].native is not None:
        for c in signed["certificates"]:
            if c.name == "certificate":
                cert = c.chosen
                until = cert["tbs_certificate"]["validity"]["not_after"].native
                issuer = cert.issuer.human_friendly
                facts.append(("certificate",
                              f"{cert.subject.human_friendly} (issuer {issuer}, serial {cert.serial_number:x}, until {until})"))
    return facts


def _enveloped_facts(kind: str, content: cms.EnvelopedData | cms.AuthEnvelopedData) -> list[tuple[str, str]]:
    eci = content["encrypted_content_info" if kind == "enveloped_data" else "auth_encrypted_content_info"]
    facts = [("content encryption", str(eci["content_encryption_algorithm"]["algorithm"].native)),
             ("ciphertext", f"{len(eci['encrypted_content'].native or b'')} bytes")]
    for ri in content["recipient_infos"]:
        if ri.name != "ktri":
            facts.append(("recipient", f"{ri.name} (not supported)"))
            continue
        alg = ri.chosen["key_encryption_algorithm"]
        transport = str(alg["algorithm"].native)
        if transport == "rsaes_oaep":
            try:
                transport += f" ({read_oaep_parameters(alg['parameters'])})"
            except SmimeError as exc:
                transport += f" ({exc})"
        facts.append(("recipient", f"{describe_identifier(ri.chosen['rid'])} via {transport}"))
    return facts


def inspect_entity(entity: bytes) -> Layer:
    """Describe the outermost layer of a MIME entity; `inner` is the next entity when it is not encrypted."""
    with parse_errors_as_malformed("CMS"):
        return _inspect(entity)


def _inspect(entity: bytes) -> Layer:
    block, body = split_header_body(entity)
    ctype = content_type(block)
    if ctype.mime_type == "multipart/signed":
        parts = split_multipart_signed(entity)
        info = load_content_info(parts.signature)
        facts = [("micalg", parts.micalg or "absent"), ("protocol", parts.protocol or "absent"),
                 *_signed_facts(info["content"])]
        return Layer(ctype.mime_type, "SignedData, detached", tuple(facts), parts.content)
    if ctype.mime_type in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        info = load_content_info(decode_body(block, body))
        kind = info["content_type"].native
        facts = [("smime-type", ctype.param("smime-type") or "absent")]
        if kind == "signed_data":
            inner = info["content"]["encap_content_info"]["content"].native
            return Layer(ctype.mime_type, "SignedData", tuple(facts + _signed_facts(info["content"])),
                         inner if isinstance(inner, bytes) else None)
        name = "EnvelopedData" if kind == "enveloped_data" else "AuthEnvelopedData"
        return Layer(ctype.mime_type, name, tuple(facts + _enveloped_facts(kind, info["content"])), None)
    return Layer(ctype.mime_type, None, (), None)
