#!/usr/bin/env python3
"""An HTTPS test double of the Azure Key Vault *keys* data plane, for phiseal-kms-azure's tests.

No Azure Key Vault emulator can be installed on our build machines (see /work/shared/TESTINFRA.md
section 2), so the backend's tests drive the real Azure SDK for Rust against this double. It
follows the Key Vault REST contract as far as phiseal uses it, with real cryptography.

Usage:  kv_double.py --dir DIR [--port PORT] [--token TOKEN] [--tenant TENANT]

At start it creates (or, when restarted, reuses) a test CA and a server certificate for
IP:127.0.0.1 and DNS:localhost in DIR (ca.pem, server.pem, server.key), loads its keys from
DIR/state.json if present, serves HTTPS on 127.0.0.1:PORT (a free port if PORT is 0 or absent),
then writes the port to DIR/port (atomically) and prints it. Clients trust DIR/ca.pem. It runs
until killed. Keys live in memory and are saved to DIR/state.json after every change, so a
double that is killed and started again on the same DIR and port behaves like a vault after an
outage: same keys, same versions. DIR/state.json holds private key material: test keys only.

What it models:
- Bearer-token authentication the way the SDK negotiates it: a request without
  `Authorization: Bearer …` gets 401 with `WWW-Authenticate: Bearer
  authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"`;
  the one accepted token is TOKEN (default `phiseal-test-token`), any other gets 401 too.
- `api-version` is required on every request (any value is accepted).
- Keys: POST /keys/{name}/create (kty RSA / RSA-HSM with key_size 2048, 3072 or 4096; oct /
  oct-HSM with key_size 256; key_ops; attributes.enabled; a create for an existing name adds a
  version, as in Key Vault), GET /keys/{name}[/{version}], POST /keys/{name}/rotate (new
  version), GET /keys/{name}/versions, PATCH /keys/{name}/{version} (attributes.enabled, key_ops).
  An empty version segment (`/keys/k//wrapkey`, `/keys/k/`) means the latest version. The
  KeyBundle has kid (versioned, on the host the client addressed), kty, key_ops, n and e for RSA
  (never private parts; never k for oct keys), and attributes (enabled, created, updated,
  recoveryLevel).
- POST /keys/{name}/{version}/wrapkey and /unwrapkey with real RSA-OAEP-256 and RSA-OAEP
  (RSA keys) and A256KW (RFC 3394, oct keys) on the named version; the response kid names
  that version.
- Base64url without padding in both directions (padding is tolerated on input).
- Errors as `{"error":{"code":…,"message":…}}`: 400 BadParameter (missing api-version, bad
  JSON, unknown or unsuitable algorithm, undecryptable input, e.g. a ciphertext made by
  another version), 401 Unauthorized, 403 Forbidden (wrapKey/unwrapKey on a disabled key
  version; an operation not in the key's key_ops, with innererror KeyOperationForbidden, as
  Key Vault answers), 404 KeyNotFound (unknown key or version),
  405 for unknown routes.

What it does NOT model: RBAC and access policies (one token can do everything), real Entra ID
tokens or their expiry, soft-delete, deletion, recovery and purge, backup/restore, key import
and export/release, rotation policies and automatic rotation, tags, exp/nbf enforcement, EC
keys, sign/verify and encrypt/decrypt, RSA1_5, A128KW/A192KW and the CKM_* algorithms,
Managed HSM versus vault differences (oct keys are served by any "vault" here), paging of
version lists (one page, nextLink null), throttling (429) and service errors (5xx), request
size limits, and the exact wording of Key Vault's error messages. An outage is simulated by
killing the process and starting it again.
"""

import argparse
import base64
import datetime
import ipaddress
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RSA_SIZES = (2048, 3072, 4096)
OCT_SIZES = (256,)
RSA_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
OCT_OPS = ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KvError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner


def bad(message: str) -> KvError:
    return KvError(400, "BadParameter", message)


# --- certificates -------------------------------------------------------------------------


def ensure_certs(directory: str) -> None:
    paths = [os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key")]
    if all(os.path.exists(p) for p in paths):
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phiseal kv_double test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_atomic(paths[0], ca.public_bytes(pem))
    write_atomic(paths[1], leaf.public_bytes(pem))
    write_atomic(
        paths[2],
        leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- the vault ----------------------------------------------------------------------------


class Vault:
    """Keys by name; each a list of versions, the last one the latest."""

    def __init__(self, state_path: str):
        self.state_path = state_path
        self.lock = threading.Lock()
        self.keys = {}
        if os.path.exists(state_path):
            with open(state_path, encoding="utf-8") as f:
                for name, versions in json.load(f).items():
                    self.keys[name] = [self._load_version(v) for v in versions]

    @staticmethod
    def _load_version(v: dict) -> dict:
        v = dict(v)
        if v["kty"].startswith("RSA"):
            v["private"] = serialization.load_pem_private_key(v.pop("pem").encode(), None)
        else:
            v["private"] = bytes.fromhex(v.pop("k"))
        return v

    def _save(self) -> None:
        out = {}
        for name, versions in self.keys.items():
            out[name] = []
            for v in versions:
                d = {k: val for k, val in v.items() if k != "private"}
                if isinstance(v["private"], bytes):
                    d["k"] = v["private"].hex()
                else:
                    d["pem"] = v["private"].private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode()
                out[name].append(d)
        write_atomic(self.state_path, json.dumps(out).encode())

    def _new_version(self, kty: str, size: int, key_ops, enabled: bool) -> dict:
        if kty in ("RSA", "RSA-HSM"):
            if size not in RSA_SIZES:
                raise bad(f"key_size {size} is not supported for {kty}")
            private = rsa.generate_private_key(public_exponent=65537, key_size=size)
            allowed = RSA_OPS
        elif kty in ("oct", "oct-HSM"):
            if size not in OCT_SIZES:
                raise bad(f"key_size {size} is not supported for {kty}")
            private = secrets.token_bytes(size // 8)
            allowed = OCT_OPS
        else:
            raise bad(f"kty {kty!r} is not supported")
        ops = list(allowed) if key_ops is None else list(key_ops)
        if any(op not in allowed for op in ops):
            raise bad(f"key_ops {ops} are not valid for {kty}")
        now = int(time.time())
        return {
            "version": secrets.token_hex(16),
            "kty": kty,
            "key_ops": ops,
            "enabled": bool(enabled),
            "created": now,
            "updated": now,
            "private": private,
        }

    def _versions(self, name: str) -> list:
        versions = self.keys.get(name)
        if not versions:
            raise KvError(404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault.")
        return versions

    def _find(self, name: str, version: str) -> dict:
        versions = self._versions(name)
        if version == "":
            return versions[-1]
        for v in versions:
            if v["version"] == version:
                return v
        raise KvError(
            404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault."
        )

    @staticmethod
    def bundle(base: str, name: str, v: dict) -> dict:
        key = {"kid": f"{base}/keys/{name}/{v['version']}", "kty": v["kty"], "key_ops": v["key_ops"]}
        if v["kty"].startswith("RSA"):
            numbers = v["private"].public_key().public_numbers()
            key["n"] = b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            key["e"] = b64url_encode(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
        return {
            "key": key,
            "attributes": {
                "enabled": v["enabled"],
                "created": v["created"],
                "updated": v["updated"],
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
        }

    # Operations. Each returns a JSON-serialisable dict or raises KvError.

    def create(self, base: str, name: str, body: dict) -> dict:
        kty = body.get("kty")
        size = body.get("key_size")
        if size is None:
            size = 2048 if str(kty).startswith("RSA") else 256
        enabled = (body.get("attributes") or {}).get("enabled", True)
        with self.lock:
            v = self._new_version(kty, size, body.get("key_ops"), enabled)
            self.keys.setdefault(name, []).append(v)
            self._save()
            return self.bundle(base, name, v)

    def get(self, base: str, name: str, version: str) -> dict:
        with self.lock:
            return self.bundle(base, name, self._find(name, version))

    def rotate(self, base: str, name: str) -> dict:
        with self.lock:
            latest = self._versions(name)[-1]
            size = (
                latest["private"].key_size
                if latest["kty"].startswith("RSA")
                else len(latest["private"]) * 8
            )
            v = self._new_version(latest["kty"], size, latest["key_ops"], True)
            self.keys[name].append(v)
            self._save()
            return self.bundle(base, name, v)

    def list_versions(self, base: str, name: str) -> dict:
        with self.lock:
            items = []
            for v in self._versions(name):
                b = self.bundle(base, name, v)
                items.append({"kid": b["key"]["kid"], "attributes": b["attributes"]})
            return {"value": items, "nextLink": None}

    def update(self, base: str, name: str, version: str, body: dict) -> dict:
        with self.lock:
            v = self._find(name, version)
            attributes = body.get("attributes") or {}
            if "enabled" in attributes:
                if not isinstance(attributes["enabled"], bool):
                    raise bad("attributes.enabled must be a boolean")
                v["enabled"] = attributes["enabled"]
            if body.get("key_ops") is not None:
                v["key_ops"] = list(body["key_ops"])
            v["updated"] = int(time.time())
            self._save()
            return self.bundle(base, name, v)

    def crypto(self, base: str, name: str, version: str, op: str, body: dict) -> dict:
        with self.lock:
            v = self._find(name, version)
            if not v["enabled"]:
                raise KvError(403, "Forbidden", f"Operation {op} is not allowed on a disabled key.")
            if op not in v["key_ops"]:
                # As Key Vault answers: 403 Forbidden, inner error KeyOperationForbidden.
                raise KvError(
                    403,
                    "Forbidden",
                    f"Operation {op} is not permitted on this key.",
                    inner="KeyOperationForbidden",
                )
            private, kty = v["private"], v["kty"]
        alg = body.get("alg")
        try:
            value = b64url_decode(body.get("value"))
        except (ValueError, TypeError):
            raise bad("value is not base64url") from None
        if kty.startswith("RSA"):
            if alg == "RSA-OAEP-256":
                pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
                hlen = 32
            elif alg == "RSA-OAEP":
                pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
                hlen = 20
            else:
                raise bad(f"Algorithm {alg!r} is not supported for an RSA key.")
            k = private.key_size // 8
            if op == "wrapKey":
                if len(value) > k - 2 * hlen - 2:
                    raise bad("The value is too long for this key and algorithm.")
                result = private.public_key().encrypt(value, pad)
            else:
                try:
                    result = private.decrypt(value, pad)
                except ValueError:
                    raise bad("The value cannot be decrypted with this key.") from None
        else:
            if alg != "A256KW" or len(private) != 32:
                raise bad(f"Algorithm {alg!r} is not supported for this oct key.")
            if op == "wrapKey":
                if len(value) < 16 or len(value) % 8:
                    raise bad("A256KW wraps a multiple of 8 bytes, at least 16.")
                result = aes_key_wrap(private, value)
            else:
                try:
                    if len(value) < 24 or len(value) % 8:
                        raise InvalidUnwrap()
                    result = aes_key_unwrap(private, value)
                except InvalidUnwrap:
                    raise bad("The value cannot be unwrapped with this key.") from None
        return {"kid": f"{base}/keys/{name}/{v['version']}", "value": b64url_encode(result)}


# --- HTTP ---------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kv_double"
    sys_version = ""

    def log_message(self, fmt, *args):  # noqa: A003 - stdlib signature
        sys.stderr.write("kv_double: %s\n" % (fmt % args))

    def _send(self, status: int, body=None, headers=None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, val in (headers or {}).items():
            self.send_header(k, val)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: KvError, headers=None) -> None:
        error = {"code": e.code, "message": e.message}
        if e.inner:
            error["innererror"] = {"code": e.inner}
        self._send(e.status, {"error": error}, headers)

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        cfg = self.server.cfg
        auth = self.headers.get("Authorization") or ""
        if auth != f"Bearer {cfg['token']}":
            challenge = (
                f'Bearer authorization="https://login.microsoftonline.com/{cfg["tenant"]}", '
                'resource="https://vault.azure.net"'
            )
            message = (
                "Request is missing a Bearer or PoP token."
                if not auth.startswith("Bearer ")
                else "The access token is invalid."
            )
            self._error(KvError(401, "Unauthorized", message), {"WWW-Authenticate": challenge})
            return
        url = urlsplit(self.path)
        try:
            if not parse_qs(url.query).get("api-version"):
                raise bad("The request URI contains no api-version.")
            body = {}
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise bad("The request body is not valid JSON.") from None
                if not isinstance(body, dict):
                    raise bad("The request body must be a JSON object.")
            base = f"https://{self.headers.get('Host') or '127.0.0.1'}"
            result = self._route(method, url.path.split("/"), base, body)
        except KvError as e:
            self._error(e)
            return
        self._send(200, result)

    def _route(self, method: str, parts: list, base: str, body: dict) -> dict:
        vault = self.server.vault
        # parts[0] is "" (the path starts with "/").
        if len(parts) < 3 or parts[1] != "keys" or not NAME_RE.fullmatch(parts[2]):
            raise KvError(405, "MethodNotAllowed", "Unknown route.")
        name, rest = parts[2], parts[3:]
        if method == "POST" and rest == ["create"]:
            return vault.create(base, name, body)
        if method == "POST" and rest == ["rotate"]:
            return vault.rotate(base, name)
        if method == "GET" and rest == ["versions"]:
            return vault.list_versions(base, name)
        if method == "GET" and len(rest) <= 1:
            return vault.get(base, name, rest[0] if rest else "")
        if method == "PATCH" and len(rest) <= 1:
            return vault.update(base, name, rest[0] if rest else "", body)
        if method == "POST" and len(rest) == 2 and rest[1] in ("wrapkey", "unwrapkey"):
            op = "wrapKey" if rest[1] == "wrapkey" else "unwrapKey"
            return vault.crypto(base, name, rest[0], op, body)
        raise KvError(405, "MethodNotAllowed", "Unknown route.")

    def do_GET(self):  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_PATCH(self):  # noqa: N802
        self._handle("PATCH")

    def do_PUT(self):  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self):  # noqa: N802
        self._handle("DELETE")


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="phiseal-test-token")
    parser.add_argument("--tenant", default="00000000-0000-0000-0000-000000000000")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    ensure_certs(args.dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.path.join(args.dir, "server.pem"), os.path.join(args.dir, "server.key"))
    server = Server(("127.0.0.1", args.port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.vault = Vault(os.path.join(args.dir, "state.json"))
    server.cfg = {"token": args.token, "tenant": args.tenant}
    port = server.server_address[1]
    write_atomic(os.path.join(args.dir, "port"), str(port).encode())
    print(port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
