#!/usr/bin/env python3
"""Known-answer test vectors for the phiseal ciphertext format v1.

This is an independent implementation of docs/FORMAT.md, written from that document alone
(not from the Rust sources), in Python 3.11 with the `cryptography` package for AES-256-GCM
and ChaCha20-Poly1305. HKDF-SHA256 (RFC 5869) and HChaCha20 (draft-irtf-cfrg-xchacha-03) are
implemented here; both are checked against published test vectors before anything is written.

Usage:
    python3 test-vectors/generate.py          # (re)write the JSON files next to this script
    python3 test-vectors/generate.py --check  # exit 1 if a committed file differs

Every input is fixed (derived from SHA-256 of a label), so the output is deterministic.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

OUT_DIR = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256. An empty salt is used as given (HMAC pads it to zeros)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def _rotl32(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl32(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl32(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl32(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl32(s[b] ^ s[c], 7)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha-03 §2.2): 20 ChaCha rounds, no final addition,
    output state words 0..3 and 12..15 little-endian."""
    assert len(key) == 32 and len(nonce16) == 16
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state += list(struct.unpack("<8I", key))
    state += list(struct.unpack("<4I", nonce16))
    for _ in range(10):
        _quarter_round(state, 0, 4, 8, 12)
        _quarter_round(state, 1, 5, 9, 13)
        _quarter_round(state, 2, 6, 10, 14)
        _quarter_round(state, 3, 7, 11, 15)
        _quarter_round(state, 0, 5, 10, 15)
        _quarter_round(state, 1, 6, 11, 12)
        _quarter_round(state, 2, 7, 8, 13)
        _quarter_round(state, 3, 4, 9, 14)
    return struct.pack("<8I", *(state[0:4] + state[12:16]))


def xchacha20_poly1305_encrypt(key: bytes, nonce24: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """AEAD_XChaCha20_Poly1305 (draft-irtf-cfrg-xchacha-03 §2.3). Returns ciphertext ‖ tag."""
    assert len(nonce24) == 24
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(b"\x00" * 4 + nonce24[16:], plaintext, aad)


def self_test() -> None:
    """Check the hand-written primitives against published vectors; fail loudly if wrong."""
    # RFC 5869 Appendix A.1 (HKDF-SHA256, basic test case).
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    expect = (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    if okm.hex() != expect:
        sys.exit("FATAL: HKDF-SHA256 does not match RFC 5869 A.1")
    # RFC 5869 Appendix A.3 (zero-length salt and info).
    okm = hkdf_sha256(bytes.fromhex("0b" * 22), b"", b"", 42)
    expect = (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    if okm.hex() != expect:
        sys.exit("FATAL: HKDF-SHA256 does not match RFC 5869 A.3")

    # draft-irtf-cfrg-xchacha-03 §2.2.1 (HChaCha20).
    sub = hchacha20(
        bytes(range(32)),
        bytes.fromhex("000000090000004a0000000031415927"),
    )
    expect = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    if sub.hex() != expect:
        sys.exit(f"FATAL: HChaCha20 does not match draft-irtf-cfrg-xchacha-03 §2.2.1: {sub.hex()}")

    # draft-irtf-cfrg-xchacha-03 §A.3.1 (AEAD_XChaCha20_Poly1305).
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    ct = xchacha20_poly1305_encrypt(
        bytes(range(0x80, 0xA0)),
        bytes(range(0x40, 0x58)),
        bytes.fromhex("50515253c0c1c2c3c4c5c6c7"),
        plaintext,
    )
    expect_ct = (
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
    )
    expect_tag = "c0875924c1c7987947deafd8780acf49"
    if ct.hex() != expect_ct + expect_tag:
        sys.exit("FATAL: XChaCha20-Poly1305 does not match draft-irtf-cfrg-xchacha-03 §A.3.1")


# ---------------------------------------------------------------------------------------------
# Format v1 (docs/FORMAT.md)
# ---------------------------------------------------------------------------------------------

FORMAT_VERSION = 0x01
ALG_AES = 0x01
ALG_XCHACHA = 0x02
NONCE_MATERIAL_LEN = {ALG_AES: 22, ALG_XCHACHA: 24}  # §2
TAG_LEN = 16
AES_INFO = b"phiseal v1 aes-256-gcm-hkdf subkey"  # §3.1
XCHACHA_INFO = b"phiseal v1 xchacha20-poly1305 key"  # §3.2
TEXT_PREFIX = "phs1:"  # §5


def context_bytes(tenant: str, field: str, record: str | None) -> bytes:
    """§4: u8 len(T) ‖ T ‖ u8 len(F) ‖ F ‖ (0x00 | 0x01 ‖ u16be len(R) ‖ R)."""
    t, f = tenant.encode(), field.encode()
    assert 1 <= len(t) <= 128 and 1 <= len(f) <= 128
    out = bytes([len(t)]) + t + bytes([len(f)]) + f
    if record is None:
        return out + b"\x00"
    r = record.encode("utf-8")
    assert 1 <= len(r) <= 512
    return out + b"\x01" + struct.pack(">H", len(r)) + r


def header_bytes(alg: int, key_version: int, nonce_material: bytes) -> bytes:
    """§2: version ‖ algorithm ‖ u32be key version ‖ nonce material."""
    assert 1 <= key_version <= 0xFFFFFFFF
    assert len(nonce_material) == NONCE_MATERIAL_LEN[alg]
    return bytes([FORMAT_VERSION, alg]) + struct.pack(">I", key_version) + nonce_material


def seal(alg: int, tk: bytes, key_version: int, nonce_material: bytes, ctx: bytes, pt: bytes):
    """Returns (binary ciphertext, aad, derived key)."""
    header = header_bytes(alg, key_version, nonce_material)
    aad = header + ctx
    if alg == ALG_AES:
        salt, nonce = nonce_material[:10], nonce_material[10:]
        key = hkdf_sha256(tk, salt, AES_INFO, 32)
        body = AESGCM(key).encrypt(nonce, pt, aad)
    else:
        key = hkdf_sha256(tk, b"", XCHACHA_INFO, 32)
        body = xchacha20_poly1305_encrypt(key, nonce_material, aad, pt)
    return header + body, aad, key


def to_text(binary: bytes) -> str:
    """§5: "phs1:" ‖ base64url without padding."""
    return TEXT_PREFIX + base64.urlsafe_b64encode(binary).decode().rstrip("=")


# ---------------------------------------------------------------------------------------------
# Case definitions
# ---------------------------------------------------------------------------------------------


def det(label: str, n: int) -> bytes:
    """Deterministic filler bytes: SHA-256 in counter mode over a label."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"phiseal-test-vectors/{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


NON_ASCII_RECORD = "patient/Zoë-Ærøskøbing-日本語-🩺"
LONG_TENANT = ("tenant-" + "A1b2.C3_d4:" * 12)[:128]  # 128 bytes, every alphabet class
LONG_RECORD = ("rec-" + "x" * 508)  # 512 bytes: u16be length 0x0200 exercises the high byte

# (name, description, tenant, field, record, key_version, plaintext_len)
POSITIVE = [
    ("empty", "empty plaintext, no record id",
     "acme", "ssn", None, 1, 0),
    ("one-byte", "1-byte plaintext",
     "acme", "ssn", None, 1, 1),
    ("64-bytes-record", "64-byte plaintext with an ASCII record id",
     "acme", "ssn", "patient-0001", 7, 64),
    ("1000-bytes", "1000-byte plaintext",
     "acme", "notes", "patient-0001", 2, 1000),
    ("non-ascii-record", "record id with multi-byte UTF-8 (2-, 3- and 4-byte sequences)",
     "acme", "dob", NON_ASCII_RECORD, 3, 10),
    ("key-version-large", "key version 4000000000 (top bit of u32 set)",
     "acme", "ssn", None, 4000000000, 16),
    ("key-version-max", "key version 2^32-1",
     "acme", "ssn", "r", 0xFFFFFFFF, 16),
    ("ambiguity-ab-c", "tenant \"ab\", field \"c\": must differ from tenant \"a\", field \"bc\"",
     "ab", "c", None, 1, 16),
    ("ambiguity-a-bc", "tenant \"a\", field \"bc\": must differ from tenant \"ab\", field \"c\"",
     "a", "bc", None, 1, 16),
    ("long-context", "128-byte tenant id and 512-byte record id (maximum lengths)",
     LONG_TENANT, "field.name-x_y:z", LONG_RECORD, 1, 33),
]

ALGORITHMS = {
    ALG_AES: (
        "aes-256-gcm-hkdf.json",
        "AES-256-GCM with HKDF-SHA256 epoch subkeys (docs/FORMAT.md §3.1)",
    ),
    ALG_XCHACHA: (
        "xchacha20-poly1305.json",
        "XChaCha20-Poly1305 with an HKDF-SHA256 derived key (docs/FORMAT.md §3.2)",
    ),
}


def tenant_key(label: str) -> bytes:
    return det(f"tenant-key/{label}", 32)


def build_positive(alg: int) -> tuple[dict, dict]:
    """Returns (file object, {case name: case dict with raw bytes for negative derivation})."""
    cases, raw = [], {}
    prefix = "aes" if alg == ALG_AES else "xchacha"
    for name, desc, tenant, field, record, kv, ptlen in POSITIVE:
        # The two ambiguity cases share key, nonce and plaintext so that only the context differs.
        label = "ambiguity" if name.startswith("ambiguity") else name
        tk = tenant_key(label)
        nm = det(f"{prefix}/nonce/{label}", NONCE_MATERIAL_LEN[alg])
        pt = det(f"plaintext/{label}", ptlen)
        ctx = context_bytes(tenant, field, record)
        ct, aad, key = seal(alg, tk, kv, nm, ctx, pt)
        case = {
            "name": name,
            "description": desc,
            "tenant_key": tk.hex(),
            "key_version": kv,
            "context": {"tenant": tenant, "field": field, "record": record},
            "nonce_material": nm.hex(),
            "plaintext": pt.hex(),
        }
        if alg == ALG_AES:
            case["subkey"] = key.hex()
        else:
            case["xkey"] = key.hex()
        case["aad"] = aad.hex()
        case["ciphertext"] = ct.hex()
        case["text"] = to_text(ct)
        cases.append(case)
        raw[name] = {"tk": tk, "ctx": (tenant, field, record), "ct": ct, "kv": kv}
    a, b = raw["ambiguity-ab-c"]["ct"], raw["ambiguity-a-bc"]["ct"]
    assert a != b, "ambiguity contexts must give different ciphertexts"
    fname, desc = ALGORITHMS[alg]
    doc = {
        "algorithm": alg,
        "description": f"phiseal format v1, algorithm 0x{alg:02x}: {desc}",
        "cases": cases,
    }
    return doc, raw


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[index] ^= 1 << bit
    return bytes(b)


def build_negative(raws: dict[int, dict]) -> dict:
    cases: list[dict] = []

    def add(name: str, desc: str, expect: str, src: dict, *, ct: bytes | None = None,
            text: str | None = None, tk: bytes | None = None, ctx: tuple | None = None,
            derived_from: str | None = None) -> None:
        tenant, field, record = ctx if ctx is not None else src["ctx"]
        case = {
            "name": name,
            "description": desc,
            "expect": expect,
            "tenant_key": (tk if tk is not None else src["tk"]).hex(),
            "context": {"tenant": tenant, "field": field, "record": record},
        }
        if derived_from is not None:
            case["derived_from"] = derived_from
        if text is not None:
            case["text"] = text
        else:
            case["ciphertext"] = ct.hex()
        cases.append(case)

    for alg, raw in raws.items():
        p = "aes" if alg == ALG_AES else "xchacha"
        fname = ALGORITHMS[alg][0]
        hdr = 6 + NONCE_MATERIAL_LEN[alg]
        base = raw["64-bytes-record"]  # record "patient-0001", 64-byte plaintext, V = 7
        bct = base["ct"]
        src = f"{fname}#64-bytes-record"
        t, f, r = base["ctx"]

        # --- Wrong context / key: the AEAD must fail. ---
        add(f"{p}-wrong-tenant", "right key and ciphertext, other tenant id", "decryption_failed",
            base, ct=bct, ctx=("acmf", f, r), derived_from=src)
        add(f"{p}-wrong-field", "other field name", "decryption_failed",
            base, ct=bct, ctx=(t, "ssm", r), derived_from=src)
        add(f"{p}-wrong-record", "other record id", "decryption_failed",
            base, ct=bct, ctx=(t, f, "patient-0002"), derived_from=src)
        add(f"{p}-record-absent", "sealed with a record id, opened without one", "decryption_failed",
            base, ct=bct, ctx=(t, f, None), derived_from=src)
        e = raw["empty"]
        add(f"{p}-record-present", "sealed without a record id, opened with one", "decryption_failed",
            e, ct=e["ct"], ctx=(*e["ctx"][:2], "patient-0001"), derived_from=f"{fname}#empty")
        add(f"{p}-record-case", "sealed with record \"r\", opened with record \"R\"",
            "decryption_failed", raw["key-version-max"], ct=raw["key-version-max"]["ct"],
            ctx=("acme", "ssn", "R"), derived_from=f"{fname}#key-version-max")
        amb = raw["ambiguity-ab-c"]
        add(f"{p}-ambiguity", "sealed for (\"ab\",\"c\"), opened as (\"a\",\"bc\")", "decryption_failed",
            amb, ct=amb["ct"], ctx=("a", "bc", None), derived_from=f"{fname}#ambiguity-ab-c")
        add(f"{p}-wrong-key", "right context, other tenant key", "decryption_failed",
            base, ct=bct, tk=tenant_key("some-other-key"), derived_from=src)

        # --- Altered bytes: the AEAD must fail. ---
        add(f"{p}-flip-ciphertext-first", "bit 0 of the first ciphertext byte flipped", "decryption_failed",
            base, ct=flip(bct, hdr), derived_from=src)
        add(f"{p}-flip-ciphertext-last", "bit 7 of the last ciphertext byte flipped", "decryption_failed",
            base, ct=flip(bct, len(bct) - TAG_LEN - 1, 7), derived_from=src)
        add(f"{p}-flip-tag-first", "bit 0 of the first tag byte flipped", "decryption_failed",
            base, ct=flip(bct, len(bct) - TAG_LEN), derived_from=src)
        add(f"{p}-flip-tag-last", "bit 7 of the last tag byte flipped", "decryption_failed",
            base, ct=flip(bct, len(bct) - 1, 7), derived_from=src)
        add(f"{p}-flip-tag-empty-plaintext", "tag bit flipped, empty plaintext", "decryption_failed",
            e, ct=flip(e["ct"], len(e["ct"]) - 1), derived_from=f"{fname}#empty")
        if alg == ALG_AES:
            add(f"{p}-flip-salt", "bit flipped in the header salt (nonce material byte 0)",
                "decryption_failed", base, ct=flip(bct, 6), derived_from=src)
            add(f"{p}-flip-nonce", "bit flipped in the header GCM nonce (nonce material byte 10)",
                "decryption_failed", base, ct=flip(bct, 16), derived_from=src)
        else:
            add(f"{p}-flip-nonce-hchacha-part", "bit flipped in nonce byte 0 (HChaCha20 input)",
                "decryption_failed", base, ct=flip(bct, 6), derived_from=src)
            add(f"{p}-flip-nonce-chacha-part", "bit flipped in nonce byte 16 (ChaCha20 nonce part)",
                "decryption_failed", base, ct=flip(bct, 6 + 16), derived_from=src)
        add(f"{p}-flip-nonce-last", "bit flipped in the last header byte", "decryption_failed",
            base, ct=flip(bct, hdr - 1, 3), derived_from=src)
        # V = 7 -> 5: still a valid key version, but the header is authenticated.
        add(f"{p}-flip-key-version-low", "key version byte 5 changed 7 -> 5 (same tenant key supplied)",
            "decryption_failed", base, ct=flip(bct, 5, 1), derived_from=src)
        add(f"{p}-flip-key-version-high", "key version byte 2 changed (7 -> 0x80000007)",
            "decryption_failed", base, ct=flip(bct, 2, 7), derived_from=src)
        add(f"{p}-extra-byte", "one byte appended", "decryption_failed",
            base, ct=bct + b"\x00", derived_from=src)
        add(f"{p}-tag-removed-plaintext-kept", "last 16 bytes removed (still long enough to parse)",
            "decryption_failed", base, ct=bct[:-TAG_LEN], derived_from=src)
        other = ALG_XCHACHA if alg == ALG_AES else ALG_AES
        swapped = bytearray(bct)
        swapped[1] = other
        add(f"{p}-algorithm-swapped", f"algorithm byte changed to the other valid id 0x{other:02x}",
            "decryption_failed", base, ct=bytes(swapped), derived_from=src)

        # --- Truncated: rejected before decryption. ---
        for n in sorted({0, 1, 5, 6, hdr - 1, hdr, hdr + 1, hdr + TAG_LEN - 1}):
            add(f"{p}-truncated-{n}", f"only the first {n} bytes of a valid ciphertext (header is {hdr} B)",
                "truncated", e, ct=e["ct"][:n], derived_from=f"{fname}#empty")

        # --- Header fields out of range (full-length input, so no other rule applies). ---
        for v in (0x00, 0x02, 0xFF):
            add(f"{p}-format-version-{v:02x}", f"format version byte 0x{v:02x}", "unknown_version",
                base, ct=bytes([v]) + bct[1:], derived_from=src)
        for a in (0x00, 0x03, 0x09, 0xFF):
            add(f"{p}-algorithm-{a:02x}", f"algorithm id 0x{a:02x}", "unknown_algorithm",
                base, ct=bct[:1] + bytes([a]) + bct[2:], derived_from=src)
        add(f"{p}-key-version-zero", "key version 0", "zero_key_version",
            base, ct=bct[:2] + b"\x00\x00\x00\x00" + bct[6:], derived_from=src)

    # --- Text form (§5). Built from algorithm 0x01 cases. ---
    raw = raws[ALG_AES]
    fname = ALGORITHMS[ALG_AES][0]
    e = raw["empty"]  # 44 bytes: standard base64 would end with one '='
    b64 = to_text(e["ct"])[len(TEXT_PREFIX):]
    src = f"{fname}#empty"
    for name, desc, text in (
        ("text-no-prefix", "base64url body without the prefix", b64),
        ("text-empty", "empty string", ""),
        ("text-uppercase-prefix", "prefix in upper case", "PHS1:" + b64),
        ("text-other-prefix-version", "prefix phs2:", "phs2:" + b64),
        ("text-prefix-no-colon", "prefix without the colon", "phs1" + b64),
        ("text-leading-space", "space before the prefix", " phs1:" + b64),
    ):
        add(name, desc, "bad_text_prefix", e, text=text, derived_from=src)
    add("text-padding-1", "one '=' padding character (44-byte binary)", "bad_base64", e,
        text=TEXT_PREFIX + b64 + "=", derived_from=src)
    xe = raws[ALG_XCHACHA]["empty"]  # 46 bytes: standard base64 would end with '=='
    xb64 = to_text(xe["ct"])[len(TEXT_PREFIX):]
    add("text-padding-2", "'==' padding (46-byte binary)", "bad_base64", xe,
        text=TEXT_PREFIX + xb64 + "==", derived_from=f"{ALGORITHMS[ALG_XCHACHA][0]}#empty")
    std = base64.b64encode(raw["64-bytes-record"]["ct"]).decode()
    assert "+" in std or "/" in std
    add("text-standard-alphabet", "standard base64 ('+' and '/') instead of base64url", "bad_base64",
        raw["64-bytes-record"], text=TEXT_PREFIX + std.rstrip("="), derived_from=f"{fname}#64-bytes-record")
    for label, ch in (("star", "*"), ("space", " "), ("newline", "\n"), ("dot", ".")):
        mid = len(b64) // 2
        add(f"text-bad-char-{label}", f"{ch!r} inserted in the middle of the base64url body", "bad_base64",
            e, text=TEXT_PREFIX + b64[:mid] + ch + b64[mid:], derived_from=src)
    add("text-trailing-newline", "newline after the base64url body", "bad_base64", e,
        text=TEXT_PREFIX + b64 + "\n", derived_from=src)
    cut = len(b64) - (len(b64) - 1) % 4  # longest prefix whose length is 1 mod 4
    assert cut % 4 == 1
    add("text-impossible-length", "body length = 1 mod 4 (no base64 string has that length)",
        "bad_base64", e, text=TEXT_PREFIX + b64[:cut], derived_from=src)
    add("text-valid-base64-truncated", "valid text whose binary is 5 bytes", "truncated", e,
        text=to_text(e["ct"][:5]), derived_from=src)
    add("text-valid-base64-unknown-algorithm", "valid text whose binary has algorithm 0x09",
        "unknown_algorithm", e, text=to_text(e["ct"][:1] + b"\x09" + e["ct"][2:]), derived_from=src)

    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return {
        "description": (
            "phiseal format v1: inputs every reader must reject. Binary cases carry `ciphertext` "
            "(hex), text cases carry `text`; `expect` names the required error. `tenant_key` and "
            "`context` are the inputs to decrypt with (for decryption_failed cases they are the "
            "ones that must fail; for the others they are those of the original ciphertext)."
        ),
        "expect_values": [
            "decryption_failed", "truncated", "unknown_version", "unknown_algorithm",
            "zero_key_version", "bad_text_prefix", "bad_base64",
        ],
        "cases": cases,
    }


def check_spec_examples(files: dict[str, dict]) -> None:
    """The worked examples in docs/FORMAT.md must agree with this implementation."""
    # §4: tenant acme, field ssn, no record.
    if context_bytes("acme", "ssn", None).hex(" ") != "04 61 63 6d 65 03 73 73 6e 00":
        sys.exit("FATAL: context encoding disagrees with the example in FORMAT.md §4")
    # §2 table: header 28 / 30 bytes, overhead 44 / 46 bytes.
    for alg, (hdr, overhead) in {ALG_AES: (28, 44), ALG_XCHACHA: (30, 46)}.items():
        ct = files[alg]["empty"]["ct"]
        if 6 + NONCE_MATERIAL_LEN[alg] != hdr or len(ct) != overhead:
            sys.exit(f"FATAL: header/overhead of 0x{alg:02x} disagrees with FORMAT.md §2")
    # §5: a 64-byte field is 108 bytes binary and 149 characters as text (algorithm 0x01).
    ct = files[ALG_AES]["64-bytes-record"]["ct"]
    if len(ct) != 108 or len(to_text(ct)) != 149:
        sys.exit("FATAL: sizes disagree with the example in FORMAT.md §5")


def render(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    self_test()
    files, raws = {}, {}
    for alg, (fname, _) in ALGORITHMS.items():
        doc, raws[alg] = build_positive(alg)
        files[fname] = render(doc)
    check_spec_examples(raws)
    files["negative.json"] = render(build_negative(raws))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = ap.parse_args()
    files = build_all()
    if args.check:
        bad = []
        for name, content in files.items():
            path = OUT_DIR / name
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                bad.append(name)
        if bad:
            print(f"test vectors differ from generate.py output: {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"ok: {len(files)} files match")
        return 0
    for name, content in files.items():
        (OUT_DIR / name).write_text(content, encoding="utf-8")
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
