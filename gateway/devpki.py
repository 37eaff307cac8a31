"""A development and test PKI shaped like IGC-Santé, so every flow can be exercised without real cards.

The shape follows the IGC-Santé hierarchy (shared reference mssante.md §3.4): a root
"AC RACINE IGC-SANTE FORT" above two intermediates, PERSONNES (practitioners' card
certificates) and ORGANISATIONS (servers and organisation mailboxes), every name marked TEST.
Practitioner subjects use the card shape `C=FR, title=<profession>, CN=8<RPPS>+SN=<surname>+GN=<given>`
with CN/SN/GN as one multi-valued RDN (RFC 5280 §4.1.2.4 allows a RelativeDistinguishedName to be a SET).

The low-level helpers (`new_rsa_key`, `issue_certificate`, `make_crl`, `practitioner_name`) are public so
tests can make the variants they need (expired, revoked, weak key, SHA-1, no EKU, wrong SAN...).
`create_dev_pki` lays out the fixed directory that the rest of the project (config/dev.toml, S/MIME, the
virtual CPS card, the relay) reads; `load_dev_pki` reads it back from its manifest.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from asn1crypto import algos as asn1_algos
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

Profile = Literal["root", "intermediate", "tls-server", "tls-client", "signature", "authentication", "encryption",
                  "organisation"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

#: A policy OID under the UUID arc 2.25 (ITU-T X.667): globally unique and obviously not an IGC-Santé policy.
TEST_POLICY_OID = ObjectIdentifier("2.25.144082220354151410101936259092983905515")
TEST_POLICY_NOTICE = "TEST - certificat de developpement MSSGW, sans valeur juridique"
CRL_BASE_URL = "http://igc-sante.test/AC_TEST"

ROOT_CN = "TEST AC RACINE IGC-SANTE FORT"
PERSONNES_CN = "TEST AC IGC-SANTE FORT PERSONNES"
ORGANISATIONS_CN = "TEST AC IGC-SANTE FORT ORGANISATIONS"

_ROOT_VALIDITY = dt.timedelta(days=20 * 365)
_CA_VALIDITY = dt.timedelta(days=10 * 365)
_LEAF_VALIDITY = dt.timedelta(days=3 * 365)
_BACKDATE = dt.timedelta(hours=1)
_CRL_NEXT_UPDATE = dt.timedelta(days=30)


class DevPkiError(GatewayError):
    """Base class of the development PKI's errors."""


class DevPkiIncomplete(DevPkiError):
    """The manifest names files that are missing: the PKI was damaged; it is never regenerated over."""

    def __init__(self, directory: Path, missing: Sequence[str]) -> None:
        self.directory = directory
        self.missing = tuple(missing)
        super().__init__(f"development PKI in {directory} is incomplete, missing: {', '.join(self.missing)}; "
                         f"remove the directory to create a new one")


class DevPkiDirectoryNotEmpty(DevPkiError):
    """The target holds files but no manifest (an interrupted run, or the wrong directory): refuse to write there."""

    def __init__(self, directory: Path, entries: Sequence[str]) -> None:
        self.directory = directory
        self.entries = tuple(entries)
        super().__init__(f"{directory} is not empty and holds no {MANIFEST} (found: {', '.join(self.entries[:5])}); "
                         f"remove it or choose another directory")


class DevPkiUnwritable(DevPkiError):
    """A file or directory of the PKI could not be created (permissions, a file in the way, a full disk)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot write the development PKI at {path}: {reason}")


class DevPkiManifestInvalid(DevPkiError):
    """The manifest cannot be read as a development PKI of a known format."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# --- records -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Practitioner:
    """A practitioner as the CPS card would carry them: RPPS, national id `8<RPPS>`, both card key pairs as files."""

    rpps: str
    id_nat: str
    surname: str
    given_name: str
    profession: str
    email: str
    auth_cert: Path
    auth_key: Path
    auth_p12: Path
    sign_cert: Path
    sign_key: Path
    sign_p12: Path
    p12_password_file: Path

    def p12_password(self) -> bytes:
        return self.p12_password_file.read_bytes()


@dataclass(frozen=True, slots=True)
class RevokedPractitioner:
    """A practitioner whose signature certificate is listed in the PERSONNES CRL (revocation tests)."""

    rpps: str
    id_nat: str
    surname: str
    given_name: str
    profession: str
    email: str
    sign_cert: Path
    sign_key: Path
    serial: int


@dataclass(frozen=True, slots=True)
class Organisation:
    """An organisation mailbox (MSSanté BAL type ORG) and its certificate, issued by ORGANISATIONS."""

    name: str
    siret: str
    id_nat_struct: str
    email: str
    cert: Path
    key: Path
    p12: Path
    p12_password_file: Path

    def p12_password(self) -> bytes:
        return self.p12_password_file.read_bytes()


@dataclass(frozen=True, slots=True)
class DevPki:
    """Who's who in a development PKI; every path is absolute (the manifest stores them relative to `directory`)."""

    directory: Path
    domain: str
    gateway_hostname: str
    root_cert: Path
    root_key: Path
    root_crl_pem: Path
    personnes_cert: Path
    personnes_key: Path
    personnes_crl_pem: Path
    personnes_crl_der: Path
    organisations_cert: Path
    organisations_key: Path
    organisations_crl_pem: Path
    organisations_crl_der: Path
    ca_bundle: Path
    crls_pem: Path
    tls_server_cert: Path
    tls_server_key: Path
    tls_server_chain: Path
    practitioners: tuple[Practitioner, ...]
    organisation: Organisation
    revoked: RevokedPractitioner

    def practitioner(self, rpps: str) -> Practitioner:
        for p in self.practitioners:
            if p.rpps == rpps:
                return p
        raise KeyError(rpps)

    def certificates(self) -> Iterator[tuple[str, Path]]:
        """Every certificate with its role, CAs first (what `mssgw pki show` prints)."""
        yield "root", self.root_cert
        yield "ca-personnes", self.personnes_cert
        yield "ca-organisations", self.organisations_cert
        yield "gateway-tls-server", self.tls_server_cert
        for p in self.practitioners:
            yield f"practitioner-{p.rpps}-auth", p.auth_cert
            yield f"practitioner-{p.rpps}-sign", p.sign_cert
        yield "organisation", self.organisation.cert
        yield f"revoked-{self.revoked.rpps}-sign", self.revoked.sign_cert


# --- low-level helpers ---------------------------------------------------------------------------------------------

class _Default(enum.Enum):
    """Marker for 'what the profile says' in `issue_certificate`, distinct from None (= omit the extension)."""

    PROFILE = enum.auto()


PROFILE_DEFAULT = _Default.PROFILE


def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """An RSA key; IGC-Santé and the CPS3 card use RSA-2048 with e = 65537."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def practitioner_name(rpps: str, surname: str, given: str, title: str, *, test_marker: str | None = "TEST") -> x509.Name:
    """The CPS card subject: `C=FR, [OU=TEST,] title=<profession>, CN=8<RPPS>+SN=<surname>+GN=<given>`.

    CN, SN and GN form one multi-valued RDN as on IGC-Santé card certificates (mssante.md §3.4); the RPPS is the
    CN minus its leading `8` (the idNat_PS type for RPPS). `test_marker` adds an OU so that no development
    certificate can be mistaken for a real one; pass None for the exact card shape.
    """
    rdns = [x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")])]
    if test_marker:
        rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, test_marker)]))
    rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.TITLE, title)]))
    rdns.append(x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "8" + rpps),
        x509.NameAttribute(NameOID.SURNAME, surname),
        x509.NameAttribute(NameOID.GIVEN_NAME, given),
    ]))
    return x509.Name(rdns)


def ca_name(cn: str) -> x509.Name:
    """An IGC-Santé CA name with the TEST markers: `C=FR, O=ASIP-SANTE TEST, OU=0002 187512751, OU=IGC-SANTE TEST`."""
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ASIP-SANTE TEST"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "0002 187512751"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "IGC-SANTE TEST"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def structure_name(cn: str, siret: str, org: str, *, state: str | None = None) -> x509.Name:
    """An operator or organisation subject: `C=FR, [ST=<Dept (NN)>,] O=<org>, OU=3<SIRET>, CN=<cn>` (§3.4)."""
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]
    if state:
        attrs.append(x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, state))
    attrs += [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "3" + siret),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ]
    return x509.Name(attrs)


def _key_usage(*, digital_signature: bool = False, non_repudiation: bool = False, key_encipherment: bool = False,
               cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=non_repudiation,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False)


# Key usage per profile (RFC 5280 §4.2.1.3). The signature certificate carries nonRepudiation ONLY, like the card's
# CPS_PRIV_SIG key (mssante.md §3.2): RFC 8550 §4.4.2 accepts digitalSignature OR nonRepudiation for S/MIME signing,
# and both OpenSSL (smimesign purpose) and NSS (certUsageEmailSigner) accept nonRepudiation alone, so the faithful
# shape costs no interoperability and lets tests catch code that wrongly demands digitalSignature.
_PROFILE_KEY_USAGE: dict[Profile, x509.KeyUsage] = {
    "root": _key_usage(cert_sign=True),
    "intermediate": _key_usage(cert_sign=True),
    "tls-server": _key_usage(digital_signature=True, key_encipherment=True),
    "tls-client": _key_usage(digital_signature=True),
    "signature": _key_usage(non_repudiation=True),
    "authentication": _key_usage(digital_signature=True, key_encipherment=True),
    "encryption": _key_usage(key_encipherment=True),
    "organisation": _key_usage(digital_signature=True, non_repudiation=True, key_encipherment=True),
}

_PROFILE_EKU: dict[Profile, tuple[ObjectIdentifier, ...] | None] = {
    "root": None,
    "intermediate": None,
    "tls-server": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    "tls-client": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "signature": (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    "authentication": (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION),
    "encryption": (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    "organisation": (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
}


def issue_certificate(
    issuer_cert: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    subject: x509.Name,
    public_key: rsa.RSAPublicKey,
    *,
    profile: Profile,
    sans: Sequence[x509.GeneralName] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    serial: int | None = None,
    crl_url: str | None = None,
    key_usage: x509.KeyUsage | None | _Default = PROFILE_DEFAULT,
    extended_key_usage: Sequence[ObjectIdentifier] | None | _Default = PROFILE_DEFAULT,
    policies: bool = True,
) -> x509.Certificate:
    """Issue one certificate of `profile` (RFC 5280 §4.2 extensions); `issuer_cert=None` makes it self-signed.

    Defaults: validity from one hour ago for three years (CAs longer), SHA-256, a random 159-bit serial,
    SKI/AKI, the profile's key usage and EKU (pass None to omit one, or a value to override it), a test
    certificate policy on leaves, and a CRL distribution point when `crl_url` is given.
    """
    now = dt.datetime.now(dt.UTC)
    ca = profile in ("root", "intermediate")
    if not_before is None:
        not_before = now - _BACKDATE
    if not_after is None:
        not_after = not_before + {"root": _ROOT_VALIDITY, "intermediate": _CA_VALIDITY}.get(profile, _LEAF_VALIDITY)
    issuer_name = subject if issuer_cert is None else issuer_cert.subject
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if profile == "intermediate" else None),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )
    ku = _PROFILE_KEY_USAGE[profile] if key_usage is PROFILE_DEFAULT else key_usage
    if isinstance(ku, x509.KeyUsage):
        builder = builder.add_extension(ku, critical=True)
    eku = _PROFILE_EKU[profile] if extended_key_usage is PROFILE_DEFAULT else extended_key_usage
    if eku is not None and not isinstance(eku, _Default):
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if crl_url:
        dp = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([dp]), critical=False)
    if policies and not ca:
        policy = x509.PolicyInformation(TEST_POLICY_OID, [x509.UserNotice(None, TEST_POLICY_NOTICE)])
        builder = builder.add_extension(x509.CertificatePolicies([policy]), critical=False)
    return x509.load_der_x509_certificate(_sign(builder, issuer_key, hash_alg, asn1_x509.Certificate,
                                                "tbs_certificate", "signature_value"))


_SHA2 = (hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512)


def _sign(builder: x509.CertificateBuilder | x509.CertificateRevocationListBuilder, key: rsa.RSAPrivateKey,
          hash_alg: hashes.HashAlgorithm | None, asn1_type: type[Any], tbs_field: str, sig_field: str) -> bytes:
    """Sign with SHA-2 through the builder; with SHA-1, which the builder refuses, re-sign the TBS with asn1crypto.

    The SHA-1 path exists only so tests can prove that such signatures are rejected (RFC 8550 §4.4.1 deprecates it).
    """
    if hash_alg is None or isinstance(hash_alg, _SHA2):
        return builder.sign(key, hash_alg or hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    if not isinstance(hash_alg, hashes.SHA1):
        raise TypeError(f"unsupported signature hash {hash_alg.name}")
    parsed = asn1_type.load(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    algorithm = asn1_algos.SignedDigestAlgorithm({"algorithm": "sha1_rsa"})
    parsed[tbs_field]["signature"] = algorithm
    tbs = parsed[tbs_field].dump(force=True)
    parsed["signature_algorithm"] = algorithm
    parsed[sig_field] = key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    der: bytes = parsed.dump(force=True)
    return der


def make_crl(
    issuer_cert: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    revoked: Sequence[tuple[int, dt.datetime]],
    *,
    now: dt.datetime | None = None,
    next_update: dt.timedelta = _CRL_NEXT_UPDATE,
    crl_number: int = 1,
    reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise,
    hash_alg: hashes.HashAlgorithm | None = None,
) -> x509.CertificateRevocationList:
    """A CRL (RFC 5280 §5) listing `revoked` (serial, revocation date), with CRL number and AKI (§5.2.1, §5.2.3)."""
    now = now if now is not None else dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    for serial, when in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return x509.load_der_x509_crl(_sign(builder, issuer_key, hash_alg, asn1_crl.CertificateList, "tbs_cert_list",
                                        "signature"))


def pkcs12_bytes(friendly_name: str, key: rsa.RSAPrivateKey, cert: x509.Certificate,
                 chain: Sequence[x509.Certificate], password: bytes) -> bytes:
    """A PKCS#12 (RFC 7292) with PBES2/AES-256 and an HMAC-SHA-256 MAC, which OpenSSL 3 and NSS both read."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(20000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(friendly_name.encode(), key, cert, list(chain), encryption)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DevPkiManifestInvalid(path, "not an RSA private key")
    return key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- the fixed layout ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Person:
    rpps: str
    surname: str
    given_name: str
    profession: str
    local_part: str


PRACTITIONERS = (
    _Person("10001234567", "EXEMPLE", "Jeanne", "Médecin", "jeanne.exemple"),
    _Person("10007654321", "TESTEUR", "Paul", "Pharmacien", "paul.testeur"),
)
REVOKED = _Person("10000000001", "REVOQUE", "Rémi", "Médecin", "remi.revoque")
GATEWAY_ORG = "MSSGW DEV TEST"
GATEWAY_SIRET = "99900000100019"
ORGANISATION_NAME = "CENTRE DE SANTE EXEMPLE"
ORGANISATION_SIRET = "99900000200017"


class _Writer:
    """Writes new files only (O_EXCL: never over an existing key), with their final mode, fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: set[Path] = set()

    def write(self, rel: str, data: bytes, mode: int) -> Path:
        path = self.root / rel
        parent = path.parent
        for d in reversed([parent, *parent.relative_to(self.root).parents][:-1]):
            d = self.root / d
            if d not in self.dirs:
                d.mkdir(mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
                self.dirs.add(d)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what the layout promises
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def cert(self, rel: str, cert: x509.Certificate) -> Path:
        return self.write(rel, pem(cert), 0o644)

    def key(self, rel: str, key: rsa.RSAPrivateKey) -> Path:
        return self.write(rel, key_pem(key), 0o600)

    def sync_dirs(self) -> None:
        for d in sorted(self.dirs | {self.root}, key=lambda p: len(p.parts), reverse=True):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _issue_ca(w: _Writer, sub: str, cn: str, root_cert: x509.Certificate, root_key: rsa.RSAPrivateKey,
              revoked: Sequence[tuple[int, dt.datetime]], now: dt.datetime
              ) -> tuple[x509.Certificate, rsa.RSAPrivateKey, x509.CertificateRevocationList]:
    key = new_rsa_key()
    cert = issue_certificate(root_cert, root_key, ca_name(cn), key.public_key(), profile="intermediate",
                             not_before=now - _BACKDATE, crl_url=f"{CRL_BASE_URL}/racine.crl")
    w.cert(f"{sub}/ca.crt", cert)
    w.key(f"{sub}/ca.key", key)
    crl = make_crl(cert, key, revoked, now=now)
    w.write(f"{sub}/crl.pem", crl.public_bytes(serialization.Encoding.PEM), 0o644)
    w.write(f"{sub}/crl.der", crl.public_bytes(serialization.Encoding.DER), 0o644)
    return cert, key, crl


def _generate(directory: Path, domain: str, gateway_hostname: str, now: dt.datetime) -> dict[str, Any]:
    """Create every file of the layout and return the manifest (paths relative to `directory`)."""
    w = _Writer(directory)
    nb = now - _BACKDATE

    root_key = new_rsa_key()
    root_cert = issue_certificate(None, root_key, ca_name(ROOT_CN), root_key.public_key(), profile="root",
                                  not_before=nb)
    w.cert("root/ca.crt", root_cert)
    w.key("root/ca.key", root_key)
    root_crl = make_crl(root_cert, root_key, [], now=now)
    w.write("root/crl.pem", root_crl.public_bytes(serialization.Encoding.PEM), 0o644)

    # The revoked practitioner's serial must be in the PERSONNES CRL, so it is chosen before the CA signs its CRL.
    revoked_serial = x509.random_serial_number()
    pers_cert, pers_key, pers_crl = _issue_ca(w, "personnes", PERSONNES_CN, root_cert, root_key,
                                              [(revoked_serial, nb)], now)
    org_cert, org_key, org_crl = _issue_ca(w, "organisations", ORGANISATIONS_CN, root_cert, root_key, [], now)
    pers_url, org_url = f"{CRL_BASE_URL}/personnes.crl", f"{CRL_BASE_URL}/organisations.crl"

    w.write("ca-bundle.pem", pem(root_cert) + pem(pers_cert) + pem(org_cert), 0o644)
    w.write("crls.pem", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root_crl, pers_crl, org_crl)),
            0o644)

    gw_key = new_rsa_key()
    gw_sans: list[x509.GeneralName] = [x509.DNSName(gateway_hostname), x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    gw_cert = issue_certificate(org_cert, org_key,
                                structure_name(gateway_hostname, GATEWAY_SIRET, GATEWAY_ORG, state="Paris (75)"),
                                gw_key.public_key(), profile="tls-server", sans=gw_sans, not_before=nb,
                                crl_url=org_url)
    w.cert("gateway/tls-server.crt", gw_cert)
    w.key("gateway/tls-server.key", gw_key)
    w.write("gateway/tls-server-chain.pem", pem(gw_cert) + pem(org_cert), 0o644)

    practitioners = []
    for person in PRACTITIONERS:
        base = f"practitioners/{person.rpps}"
        email = f"{person.local_part}@{domain}"
        name = practitioner_name(person.rpps, person.surname, person.given_name, person.profession)
        password = secrets.token_urlsafe(18).encode()
        w.write(f"{base}/p12-password", password, 0o600)
        entry: dict[str, Any] = {"rpps": person.rpps, "id_nat": "8" + person.rpps, "surname": person.surname,
                                 "given_name": person.given_name, "profession": person.profession, "email": email,
                                 "p12_password_file": f"{base}/p12-password"}
        roles: tuple[tuple[str, Profile], ...] = (("auth", "authentication"), ("sign", "signature"))
        for role, profile in roles:
            key = new_rsa_key()
            cert = issue_certificate(pers_cert, pers_key, name, key.public_key(), profile=profile,
                                     sans=[x509.RFC822Name(email)], not_before=nb, crl_url=pers_url)
            entry[f"{role}_cert"] = str(w.cert(f"{base}/{role}.crt", cert).relative_to(directory))
            entry[f"{role}_key"] = str(w.key(f"{base}/{role}.key", key).relative_to(directory))
            label = f"{person.given_name} {person.surname} ({'authentification' if role == 'auth' else 'signature'})"
            p12 = pkcs12_bytes(label, key, cert, [pers_cert, root_cert], password)
            entry[f"{role}_p12"] = str(w.write(f"{base}/{role}.p12", p12, 0o600).relative_to(directory))
        practitioners.append(entry)

    o_key = new_rsa_key()
    o_email = f"secretariat@{domain}"
    o_cert = issue_certificate(org_cert, org_key,
                               structure_name(ORGANISATION_NAME, ORGANISATION_SIRET, ORGANISATION_NAME + " TEST"),
                               o_key.public_key(), profile="organisation", sans=[x509.RFC822Name(o_email)],
                               not_before=nb, crl_url=org_url)
    o_password = secrets.token_urlsafe(18).encode()
    w.cert("organisation/org.crt", o_cert)
    w.key("organisation/org.key", o_key)
    w.write("organisation/p12-password", o_password, 0o600)
    w.write("organisation/org.p12", pkcs12_bytes(ORGANISATION_NAME, o_key, o_cert, [org_cert, root_cert], o_password),
            0o600)

    r_key = new_rsa_key()
    r_email = f"{REVOKED.local_part}@{domain}"
    r_cert = issue_certificate(pers_cert, pers_key,
                               practitioner_name(REVOKED.rpps, REVOKED.surname, REVOKED.given_name, REVOKED.profession),
                               r_key.public_key(), profile="signature", sans=[x509.RFC822Name(r_email)],
                               not_before=nb, serial=revoked_serial, crl_url=pers_url)
    w.cert("revoked/sign.crt", r_cert)
    w.key("revoked/sign.key", r_key)
    w.sync_dirs()

    return {
        "format": MANIFEST_FORMAT,
        "created": now.isoformat(),
        "domain": domain,
        "gateway_hostname": gateway_hostname,
        "root_cert": "root/ca.crt", "root_key": "root/ca.key", "root_crl_pem": "root/crl.pem",
        "personnes_cert": "personnes/ca.crt", "personnes_key": "personnes/ca.key",
        "personnes_crl_pem": "personnes/crl.pem", "personnes_crl_der": "personnes/crl.der",
        "organisations_cert": "organisations/ca.crt", "organisations_key": "organisations/ca.key",
        "organisations_crl_pem": "organisations/crl.pem", "organisations_crl_der": "organisations/crl.der",
        "ca_bundle": "ca-bundle.pem", "crls_pem": "crls.pem",
        "tls_server_cert": "gateway/tls-server.crt", "tls_server_key": "gateway/tls-server.key",
        "tls_server_chain": "gateway/tls-server-chain.pem",
        "practitioners": practitioners,
        "organisation": {"name": ORGANISATION_NAME, "siret": ORGANISATION_SIRET, "id_nat_struct": "3" + ORGANISATION_SIRET,
                         "email": o_email, "cert": "organisation/org.crt", "key": "organisation/org.key",
                         "p12": "organisation/org.p12", "p12_password_file": "organisation/p12-password"},
        "revoked": {"rpps": REVOKED.rpps, "id_nat": "8" + REVOKED.rpps, "surname": REVOKED.surname,
                    "given_name": REVOKED.given_name, "profession": REVOKED.profession, "email": r_email,
                    "sign_cert": "revoked/sign.crt", "sign_key": "revoked/sign.key", "serial": revoked_serial},
    }


def _record(cls: type[Any], data: Any, directory: Path, where: str, missing: list[str], manifest: Path) -> Any:
    """Build a frozen record from manifest data, resolving Path fields against `directory`."""
    if not isinstance(data, dict):
        raise DevPkiManifestInvalid(manifest, f"{where} is not an object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "directory":
            continue
        if f.name not in data:
            raise DevPkiManifestInvalid(manifest, f"{where} lacks {f.name!r}")
        value = data[f.name]
        if f.type == "Path":
            if not isinstance(value, str) or Path(value).is_absolute() or ".." in Path(value).parts:
                raise DevPkiManifestInvalid(manifest, f"{where}.{f.name} is not a relative path inside the PKI")
            value = directory / value
            if not value.is_file():
                missing.append(str(value.relative_to(directory)))
        values[f.name] = value
    return values


def load_dev_pki(directory: Path) -> DevPki:
    """Read a development PKI from DIR/manifest.json; every file it names must exist."""
    directory = directory.resolve()
    manifest = directory / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DevPkiManifestInvalid(manifest, "no such file (run `mssgw pki dev-init` first)") from None
    except (OSError, ValueError) as exc:
        raise DevPkiManifestInvalid(manifest, f"unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DevPkiManifestInvalid(manifest, f"not a development PKI manifest of format {MANIFEST_FORMAT}")
    missing: list[str] = []
    top = _record(DevPki, data, directory, "manifest", missing, manifest)
    if not isinstance(top["practitioners"], list):
        raise DevPkiManifestInvalid(manifest, "practitioners is not a list")
    top["practitioners"] = tuple(
        Practitioner(**_record(Practitioner, p, directory, f"practitioners[{i}]", missing, manifest))
        for i, p in enumerate(top["practitioners"]))
    top["organisation"] = Organisation(**_record(Organisation, top["organisation"], directory, "organisation",
                                                 missing, manifest))
    top["revoked"] = RevokedPractitioner(**_record(RevokedPractitioner, top["revoked"], directory, "revoked",
                                                   missing, manifest))
    if missing:
        raise DevPkiIncomplete(directory, missing)
    return DevPki(directory=directory, **top)


def create_dev_pki(directory: Path, *, domain: str = "dev.mssante.test", gateway_hostname: str = "gw.dev.mssante.test",
                   now: dt.datetime | None = None) -> DevPki:
    """Create the development PKI in `directory`, or return the one already there (idempotent).

    Never writes over existing keys: a complete PKI is loaded as is (whatever `domain` it was made for), a damaged one
    or a non-empty directory without a manifest is an error. Concurrent callers serialise on a lock of the directory,
    so parallel test sessions sharing `var/pki` create it once. The manifest is written last, atomically: its presence
    means every file it names was written and fsynced.
    """
    directory = directory.resolve()
    if (directory / MANIFEST).exists():
        return _existing(directory, domain, gateway_hostname)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise DevPkiUnwritable(directory, exc.strerror or str(exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (directory / MANIFEST).exists():
            return _existing(directory, domain, gateway_hostname)
        entries = sorted(os.listdir(directory))
        if entries:
            raise DevPkiDirectoryNotEmpty(directory, entries)
        now = now if now is not None else dt.datetime.now(dt.UTC)
        try:
            os.chmod(directory, 0o700)
            manifest = _generate(directory, domain, gateway_hostname, now)
            tmp = directory / f".{MANIFEST}.tmp"
            _Writer(directory).write(tmp.name, json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n",
                                     0o644)
            os.replace(tmp, directory / MANIFEST)
            os.fsync(fd)
        except OSError as exc:
            raise DevPkiUnwritable(Path(exc.filename or directory), exc.strerror or str(exc)) from None
    finally:
        os.close(fd)  # closing the descriptor releases the lock
    pki = load_dev_pki(directory)
    log.info("created development PKI in %s for %s (%d certificates)", directory, domain, len(list(pki.certificates())))
    return pki


def _existing(directory: Path, domain: str, gateway_hostname: str) -> DevPki:
    pki = load_dev_pki(directory)
    if (pki.domain, pki.gateway_hostname) != (domain, gateway_hostname):
        log.warning("development PKI in %s was made for %s / %s, not %s / %s; keeping it (remove it to regenerate)",
                    directory, pki.domain, pki.gateway_hostname, domain, gateway_hostname)
    return pki
