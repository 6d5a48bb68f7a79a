"""Signed recordings: an Ed25519 signature over a run's manifest digest and every artifact's digest.

With ``REPRO_TRACK_SIGNING_KEY`` set, a recording is staged with ``repro/signature.json`` beside the
manifest: the sha256 of each file in the artifact tree, the manifest digest, the key id and the
signature over them (in the spool, inside the entry's meta.json until its tree is built for upload).
Reading a run back checks that signature against the public keys listed in
``REPRO_TRACK_TRUSTED_KEYS`` and each digest against the downloaded files. The public key inside
``signature.json`` only names the signer: anyone can sign with a key of their own, so a run is
trusted only when a key of the trusted list verifies it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from . import settings, tags
from .errors import SignatureError, SigningKeyError, StoreError
from .manifest import canonical_json

FORMAT = "repro-track-signature/v1"
ALGORITHM = "ed25519"
# Signed bytes start with this line, so a signature made for a DSSE envelope (or anything else signed
# with the same key) can never pass as a recording's signature, and the other way round.
_DOMAIN = b"repro-track recording signature v1\n"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
PRIVATE_KEY_FILE = "repro-track-signing-key.pem"
PUBLIC_KEY_FILE = "repro-track-signing-key.pub.pem"
_MAX_ARTIFACTS = 10_000  # a run with more files than this is not one repro-track wrote
_MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
_KEY_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class SignatureCheck:
    """Whether a run is signed, by which key id, and whether that signature verified here."""

    signed: bool
    key_id: str | None = None
    verified: bool = False
    problem: str | None = None

    def describe(self) -> str:
        """One line for people: signed or not, by which key, verified or why not."""
        if not self.signed:
            return "not signed"
        if self.verified:
            return f"signed by key {self.key_id}, verified against the trusted keys here"
        return f"signed by key {self.key_id}, NOT verified: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        """The ``signature`` object of ``repro-track show --json``."""
        return {"signed": self.signed, "key_id": self.key_id, "verified": self.verified,
                "problem": self.problem}


UNSIGNED = SignatureCheck(False, problem=f"the run has no {tags.SIGNATURE_PATH}")


# ---------------------------------------------------------------- keys

def key_id(public_key: Any) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def _raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: Path | None = None) -> Any:
    """The Ed25519 private key in ``path`` (default: ``REPRO_TRACK_SIGNING_KEY``), PEM or OpenSSH."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = path or settings.SIGNING_KEY.get()
    if path is None:
        raise SigningKeyError(f"no signing key: set {settings.SIGNING_KEY.name} to a key file made by "
                              "`repro-track keygen`")
    where = f"{settings.SIGNING_KEY.name}={path}"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {where} ({exc.strerror}); make one with "
                              "`repro-track keygen`", path=str(path)) from None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(f"the signing key {where} is encrypted; repro-track needs an unencrypted "
                              "key file readable only by you (chmod 600)", path=str(path)) from None
    except ValueError as exc:
        raise SigningKeyError(f"the signing key {where} is not a PEM or OpenSSH private key ({exc})",
                              path=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {where} is a {type(key).__name__}; repro-track signs "
                              "with Ed25519 keys (`repro-track keygen` makes one)", path=str(path))
    return key


def load_trusted_keys(path: Path | None = None) -> dict[str, Any]:
    """The trusted Ed25519 public keys by key id: PEM blocks or ``ssh-ed25519`` lines in a file, or in
    the ``*.pem``/``*.pub`` files of a folder (default: ``REPRO_TRACK_TRUSTED_KEYS``; none when unset)."""
    path = path or settings.TRUSTED_KEYS.get()
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".pub") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise SigningKeyError(f"{settings.TRUSTED_KEYS.name}={path} is neither a file nor a folder of "
                              "public keys", path=str(path))
    keys: dict[str, Any] = {}
    for file in files:
        for key in _public_keys(file):
            keys[key_id(key)] = key
    return keys


def _public_keys(file: Path) -> Iterator[Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        text = file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningKeyError(f"cannot read the trusted key file {file} ({exc})", path=str(file)) from None
    blocks = re.findall(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.S)
    blocks += re.findall(r"^ssh-ed25519 [A-Za-z0-9+/=]+", text, re.M)
    if not blocks:
        raise SigningKeyError(f"the trusted key file {file} holds no PEM public key or ssh-ed25519 line",
                              path=str(file))
    for block in blocks:
        try:
            key = (serialization.load_ssh_public_key(block.encode()) if block.startswith("ssh-")
                   else serialization.load_pem_public_key(block.encode()))
        except ValueError as exc:
            raise SigningKeyError(f"a key in {file} cannot be read ({exc})", path=str(file)) from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{file} holds a {type(key).__name__}; trusted keys must be Ed25519",
                                  path=str(file))
        yield key


def default_key_dir() -> Path:
    """Where ``repro-track keygen`` writes without ``--out``: ``$XDG_CONFIG_HOME/repro-track``."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "repro-track"


def keygen(folder: Path) -> tuple[Path, Path]:
    """Write a new key pair into ``folder``: the private key (mode 0600) and its public key.

    Refuses to overwrite an existing key: a lost private key means re-trusting a new one.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(f"{path} already exists; move it away or choose another --out folder",
                                  path=str(path))
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


# ---------------------------------------------------------------- signing

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under an artifact tree by its posix path (the signature file left out)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel != tags.SIGNATURE_PATH and path.is_file() and not path.is_symlink():
            out[rel] = _sha256_file(path)
    return out


def sign_staged(artifacts: Path, manifest_digest: str) -> Path | None:
    """Sign a staged artifact tree when a signing key is configured; returns the signature file.

    Called once at the end of staging a replay's tree, after the last file is written (the spool
    signs its entries with :func:`signature_for`).
    """
    if settings.SIGNING_KEY.get() is None:
        return None
    document = _document(tree_digests(artifacts), manifest_digest)
    target = artifacts / tags.SIGNATURE_PATH
    target.write_text(document, "utf-8")
    return target


def signature_for(files: dict[str, bytes | Path], manifest_digest: str) -> str | None:
    """The signature file (``repro/signature.json``) of an artifact tree that is not on disk as such:
    each file by posix path, as its bytes or as a file holding them. None without a signing key."""
    if settings.SIGNING_KEY.get() is None:
        return None
    digests = {rel: hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else _sha256_file(content)
               for rel, content in files.items() if rel != tags.SIGNATURE_PATH}
    return _document(digests, manifest_digest)


def _document(digests: dict[str, str], manifest_digest: str) -> str:
    key = load_private_key()
    public = key.public_key()
    body = {"format": FORMAT, "algorithm": ALGORITHM, "key_id": key_id(public),
            "public_key": base64.b64encode(_raw(public)).decode("ascii"),
            "manifest_digest": manifest_digest, "artifacts": dict(sorted(digests.items()))}
    signature = key.sign(_DOMAIN + canonical_json(body))
    return json.dumps({**body, "signature": base64.b64encode(signature).decode("ascii")}, indent=1,
                      sort_keys=True)


def dsse_envelope(statement: dict[str, Any]) -> dict[str, Any]:
    """A DSSE envelope around an in-toto Statement, signed with the configured key."""
    key = load_private_key()
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return {"payloadType": DSSE_PAYLOAD_TYPE,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [{"keyid": key_id(key.public_key()),
                            "sig": base64.b64encode(key.sign(pae(DSSE_PAYLOAD_TYPE, payload))).decode()}]}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


# ---------------------------------------------------------------- verifying

def verify(document: bytes, files: dict[str, Path], trusted: dict[str, Any]) -> SignatureCheck:
    """Check a signature document against trusted keys and the run's files (posix path -> local file)."""
    from cryptography.exceptions import InvalidSignature

    try:
        doc = json.loads(document)
        body = {k: doc[k] for k in ("format", "algorithm", "key_id", "public_key", "manifest_digest",
                                    "artifacts")}
        signature = base64.b64decode(doc["signature"], validate=True)
        claimed = body["key_id"]
        if body["format"] != FORMAT or body["algorithm"] != ALGORITHM:
            raise ValueError(f"unknown format {str(body['format'])[:40]!r} or algorithm "
                             f"{str(body['algorithm'])[:40]!r}")
        if not isinstance(claimed, str) or not _KEY_ID.fullmatch(claimed):
            raise ValueError("the key id is not 16 hex digits")
        if not isinstance(body["artifacts"], dict):
            raise ValueError("artifacts is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return SignatureCheck(True, None, False, f"{tags.SIGNATURE_PATH} is malformed ({exc})")
    if not trusted:
        return SignatureCheck(True, claimed, False, f"no trusted keys are configured here (set "
                              f"{settings.TRUSTED_KEYS.name} to the team's public keys)")
    key = trusted.get(claimed)
    if key is None:
        return SignatureCheck(True, claimed, False, f"key {claimed} is not among the trusted keys of "
                              f"{settings.TRUSTED_KEYS.name}")
    try:
        key.verify(signature, _DOMAIN + canonical_json(body))
    except (InvalidSignature, ValueError):
        return SignatureCheck(True, claimed, False, "the signature does not verify: signature.json was "
                              "altered or not made with this key")
    problem = _files_problem(body, files)
    return SignatureCheck(True, claimed, problem is None, problem)


def _files_problem(body: dict[str, Any], files: dict[str, Path]) -> str | None:
    signed: dict[str, Any] = body["artifacts"]
    for rel in sorted(set(signed) | set(files)):
        if rel not in files:
            return f"the signed artifact {rel} is missing from the run"
        if rel not in signed:
            return f"the artifact {rel} is not covered by the signature (added after signing)"
        if _sha256_file(files[rel]) != signed[rel]:
            return f"{rel} does not match its signed sha256: it was changed after signing"
    manifest = files.get(tags.MANIFEST_PATH)
    try:
        recorded = json.loads(manifest.read_bytes()).get("manifest_digest") if manifest else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != body["manifest_digest"]:
        return "the manifest digest does not match the signed one: the manifest was changed after signing"
    return None


def check_tree(artifacts: Path) -> SignatureCheck:
    """The signature of a staged artifact tree on this disk, checked with the trusted keys here."""
    document = artifacts / tags.SIGNATURE_PATH
    if not document.is_file():
        return UNSIGNED
    files = {rel: artifacts / rel for rel in tree_digests(artifacts)}
    try:
        trusted = load_trusted_keys()
    except SigningKeyError as exc:  # uploading must go on; the card and tag still name the key
        check = verify(document.read_bytes(), files, {})
        return dataclasses.replace(check, problem=str(exc)) if check.key_id else check
    return verify(document.read_bytes(), files, trusted)


def check_run(run_id: str, signature_file: Path | None, dest: Path,
              list_folder: Callable[[str | None], list[Any]],
              fetch: Callable[[str], Path | None]) -> SignatureCheck:
    """The signature of a stored run, checked against every artifact the run holds.

    ``list_folder`` lists one folder of the run's artifact store (None: its root); ``fetch``
    downloads one artifact into ``dest`` (the run loader's, which refuses a symbolic link in a local
    store). Files already downloaded into ``dest`` (the manifest and arrays replay goes on to use) are
    checked as they are, not downloaded again.
    """
    if signature_file is None:
        return UNSIGNED
    if signature_file.stat().st_size > _MAX_SIGNATURE_BYTES:
        return SignatureCheck(True, None, False, f"{tags.SIGNATURE_PATH} is too large to be one")
    listing = _listing(run_id, list_folder)
    if len(listing) > _MAX_ARTIFACTS:
        return SignatureCheck(True, None, False, f"the run holds more than {_MAX_ARTIFACTS} artifacts")
    files: dict[str, Path] = {}
    for rel in listing:
        if rel == tags.SIGNATURE_PATH:
            continue
        local = _fetch(rel, dest, fetch)
        if local is None:
            return SignatureCheck(True, None, False, f"the run holds an artifact with an unsafe path {rel!r}")
        files[rel] = local
    return verify(signature_file.read_bytes(), files, load_trusted_keys())


def _listing(run_id: str, list_folder: Callable[[str | None], list[Any]]) -> list[str]:
    found: list[str] = []
    folders: list[str | None] = [None]
    while folders and len(found) <= _MAX_ARTIFACTS:
        folder = folders.pop()
        try:
            entries = list_folder(folder)
        except Exception as exc:
            raise StoreError(f"run {run_id}: cannot list artifacts under {folder or '/'} ({exc})") from None
        for entry in entries:
            (folders if entry.is_dir else found).append(entry.path)
    return sorted(found)


def _fetch(rel: str, dest: Path, fetch: Callable[[str], Path | None]) -> Path | None:
    parts = PurePosixPath(rel).parts
    if (not parts or rel.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in rel
            or any(ord(c) < 32 for c in rel)):
        return None
    local = dest.joinpath(*parts)
    if not local.exists():
        local = fetch(rel) or local
    if local.is_symlink() or not local.is_file() or not local.resolve().is_relative_to(dest.resolve()):
        return None
    return local


def require(check: SignatureCheck, run_id: str) -> None:
    """Raise SignatureError unless the run is signed by a trusted key and every digest matched."""
    if not check.signed:
        raise SignatureError(
            f"run {run_id} is not signed, and signed runs are required (--require-signed or "
            f"{settings.REQUIRE_SIGNED.name}); record it with {settings.SIGNING_KEY.name} set",
            run_id=run_id)
    if not check.verified:
        raise SignatureError(f"run {run_id}: {check.describe()}; refusing to replay it", run_id=run_id,
                             key_id=check.key_id)
