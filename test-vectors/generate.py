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

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305

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
    ("5000-bytes", "5000-byte plaintext (phiseal encrypts fields from 4096 bytes up out of place)",
     "acme", "notes", "patient-0002", 2, 5000),
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
        for a in (0x00, 0x09, 0x7F, 0xFF):
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



# ---------------------------------------------------------------------------------------------
# Searchable fields (docs/FORMAT.md §3.3 deterministic AES-256-SIV, §9 blind index)
# ---------------------------------------------------------------------------------------------

ALG_SIV = 0x03
SIV_LEN = 16
SIV_INFO = b"phiseal v1 aes-256-siv key"  # §3.3
INDEX_INFO = b"phiseal v1 blind-index key"  # §9
NORMALIZATIONS = {"exact": 0x01, "case_folded": 0x02, "digits_only": 0x03}  # §9


def siv_self_test() -> None:
    """RFC 5297 A.1 (deterministic AES-SIV, one associated-data component), through the same
    `AESSIV` call used below: the one-component AD convention must match the RFC."""
    key = bytes.fromhex(
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = bytes.fromhex("101112131415161718191a1b1c1d1e1f2021222324252627")
    pt = bytes.fromhex("112233445566778899aabbccddee")
    out = AESSIV(key).encrypt(pt, [ad])
    if out.hex() != "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c":
        sys.exit("FATAL: AES-SIV does not match RFC 5297 A.1")


def field_info(field: str) -> bytes:
    """u8 len(F) ‖ F, the field part of the §3.3 / §9 HKDF info strings."""
    f = field.encode()
    assert 1 <= len(f) <= 128
    return bytes([len(f)]) + f


def siv_key(tk: bytes, field: str) -> bytes:
    """§3.3: HKDF-SHA256(TK, salt = "", info = "phiseal v1 aes-256-siv key" ‖ u8 len(F) ‖ F, 64)."""
    return hkdf_sha256(tk, b"", SIV_INFO + field_info(field), 64)


def index_key(tk: bytes, field: str) -> bytes:
    """§9: HKDF-SHA256(TK, salt = "", info = "phiseal v1 blind-index key" ‖ u8 len(F) ‖ F, 32)."""
    return hkdf_sha256(tk, b"", INDEX_INFO + field_info(field), 32)


def seal_siv(tk: bytes, key_version: int, tenant: str, field: str, pt: bytes):
    """§3.3: header(6) ‖ AES-SIV(siv_key, AD = [header(6) ‖ context], pt) (= SIV ‖ C).
    Returns (binary ciphertext, aad, siv key)."""
    assert 1 <= key_version <= 0xFFFFFFFF
    header = bytes([FORMAT_VERSION, ALG_SIV]) + struct.pack(">I", key_version)
    aad = header + context_bytes(tenant, field, None)
    key = siv_key(tk, field)
    return header + AESSIV(key).encrypt(pt, [aad]), aad, key


def normalize(name: str, value: bytes) -> bytes | None:
    """§9 normalisations; None when the value is refused."""
    if name == "exact":
        return value
    if name == "case_folded":
        try:
            return value.decode("utf-8").lower().encode("utf-8")
        except UnicodeDecodeError:
            return None
    if name == "digits_only":
        out = bytes(b for b in value if 0x30 <= b <= 0x39)
        return out if out else None
    raise ValueError(name)


def blind_index(tk: bytes, field: str, norm: str, bits: int, value: bytes):
    """§9: first bits/8 bytes of HMAC-SHA256(index_key, u8 norm ‖ u16be bits ‖ normalised).
    Returns (index, normalised, mac input, index key)."""
    assert bits % 8 == 0 and 16 <= bits <= 256
    normalised = normalize(norm, value)
    assert normalised is not None
    key = index_key(tk, field)
    mac_input = bytes([NORMALIZATIONS[norm]]) + struct.pack(">H", bits) + normalised
    return hmac.new(key, mac_input, hashlib.sha256).digest()[: bits // 8], normalised, mac_input, key


def version_key(tenant: str, version: int) -> bytes:
    """The tenant key of (tenant, version): each version is its own random key."""
    return tenant_key(f"search/{tenant}/v{version}")


SSN = b"078051120"
# (name, description, tenant, key version, field, plaintext)
SIV_POSITIVE = [
    ("ssn-acme-v1", "9-byte SSN, tenant acme, key version 1, field ssn",
     "acme", 1, "ssn", SSN),
    ("ssn-acme-v1-again", "the same inputs again: the same ciphertext (deterministic)",
     "acme", 1, "ssn", SSN),
    ("ssn-acme-v2", "the same value under key version 2 (another tenant key): unrelated",
     "acme", 2, "ssn", SSN),
    ("ssn-acme-v1-field-mrn", "the same value and key, field mrn: unrelated (other derived key)",
     "acme", 1, "mrn", SSN),
    ("ssn-globex-v1", "the same value and field, tenant globex (its own tenant key): unrelated",
     "globex", 1, "ssn", SSN),
    ("empty", "empty plaintext: the 22-byte overhead only",
     "acme", 1, "ssn", b""),
    ("one-byte", "1-byte plaintext (S2V pads a final block shorter than 16 bytes)",
     "acme", 1, "ssn", b"7"),
    ("sixteen-bytes", "16-byte plaintext (S2V xorend of exactly one block)",
     "acme", 1, "email", b"zoe@example.test"),
    ("64-bytes", "64-byte plaintext",
     "acme", 2, "notes", det("siv-plaintext/64", 64)),
    ("non-ascii", "UTF-8 plaintext with 2-, 3- and 4-byte sequences",
     "globex", 3, "name", "Zoë Ærøskøbing 日本語 🩺".encode()),
    ("key-version-max", "key version 2^32-1",
     "acme", 0xFFFFFFFF, "ssn", SSN),
    ("ambiguity-ab-c", "tenant \"ab\", field \"c\" (tenant key of \"ab\")",
     "ab", 1, "c", SSN),
    ("long-names", "128-byte tenant id and 128-byte field name (maximum lengths)",
     LONG_TENANT, 1, ("field-" + "x.y_z:" * 25)[:128], det("siv-plaintext/33", 33)),
]


def build_siv() -> dict:
    cases, raw = [], {}
    for name, desc, tenant, v, field, pt in SIV_POSITIVE:
        tk = version_key(tenant, v)
        ct, aad, key = seal_siv(tk, v, tenant, field, pt)
        assert len(ct) == 22 + len(pt)
        cases.append({
            "name": name,
            "description": desc,
            "tenant_key": tk.hex(),
            "key_version": v,
            "context": {"tenant": tenant, "field": field, "record": None},
            "plaintext": pt.hex(),
            "siv_key": key.hex(),
            "aad": aad.hex(),
            "ciphertext": ct.hex(),
            "text": to_text(ct),
        })
        raw[name] = {"tk": tk, "ctx": (tenant, field, None), "ct": ct}
    by = {c["name"]: c for c in cases}
    # The properties the vectors are meant to show.
    assert by["ssn-acme-v1"]["ciphertext"] == by["ssn-acme-v1-again"]["ciphertext"]
    for other in ("ssn-acme-v2", "ssn-acme-v1-field-mrn", "ssn-globex-v1"):
        assert by["ssn-acme-v1"]["ciphertext"][12:] != by[other]["ciphertext"][12:]

    neg = []

    def add(name, desc, expect, src_name, ct, ctx=None, tk=None):
        src = raw[src_name]
        tenant, field, record = ctx if ctx is not None else src["ctx"]
        neg.append({
            "name": name,
            "description": desc,
            "expect": expect,
            "tenant_key": (tk if tk is not None else src["tk"]).hex(),
            "context": {"tenant": tenant, "field": field, "record": record},
            "derived_from": f"aes-256-siv.json#{src_name}",
            "ciphertext": ct.hex(),
        })

    b = raw["ssn-acme-v1"]["ct"]
    long = raw["64-bytes"]["ct"]
    add("siv-wrong-field", "right key and ciphertext, field mrn", "decryption_failed",
        "ssn-acme-v1", b, ctx=("acme", "mrn", None))
    add("siv-wrong-tenant", "right key and ciphertext, tenant acmf", "decryption_failed",
        "ssn-acme-v1", b, ctx=("acmf", "ssn", None))
    add("siv-record-present", "sealed without a record id (as always), opened with one",
        "decryption_failed", "ssn-acme-v1", b, ctx=("acme", "ssn", "patient-0001"))
    add("siv-wrong-key", "right context, the tenant key of version 2", "decryption_failed",
        "ssn-acme-v1", b, tk=version_key("acme", 2))
    add("siv-ambiguity", "sealed for (\"ab\",\"c\"), opened as (\"a\",\"bc\")", "decryption_failed",
        "ambiguity-ab-c", raw["ambiguity-ab-c"]["ct"], ctx=("a", "bc", None))
    add("siv-flip-siv-first", "bit 0 of the first SIV byte flipped", "decryption_failed",
        "ssn-acme-v1", flip(b, 6))
    add("siv-flip-siv-last", "bit 7 of the last SIV byte flipped", "decryption_failed",
        "ssn-acme-v1", flip(b, 21, 7))
    add("siv-flip-siv-ctr-bit", "bit 7 of SIV byte 8 flipped (a bit CTR mode clears)",
        "decryption_failed", "ssn-acme-v1", flip(b, 6 + 8, 7))
    add("siv-flip-ciphertext-first", "bit 0 of the first ciphertext byte flipped",
        "decryption_failed", "ssn-acme-v1", flip(b, 22))
    add("siv-flip-ciphertext-last", "bit 7 of the last ciphertext byte flipped",
        "decryption_failed", "ssn-acme-v1", flip(b, len(b) - 1, 7))
    add("siv-flip-empty-siv", "SIV bit flipped, empty plaintext", "decryption_failed",
        "empty", flip(raw["empty"]["ct"], 10))
    add("siv-flip-key-version", "key version byte 5 changed 1 -> 3 (same tenant key supplied)",
        "decryption_failed", "ssn-acme-v1", flip(b, 5, 1))
    add("siv-extra-byte", "one byte appended", "decryption_failed", "ssn-acme-v1", b + b"\x00")
    add("siv-last-byte-removed", "last byte removed", "decryption_failed", "ssn-acme-v1", b[:-1])
    add("siv-algorithm-swapped", "algorithm byte changed 0x03 -> 0x01 (64-byte plaintext, long "
        "enough to parse as 0x01)", "decryption_failed", "64-bytes", long[:1] + b"\x01" + long[2:])
    e = raw["empty"]["ct"]
    for n in (5, 6, 21):
        add(f"siv-truncated-{n}", f"only the first {n} bytes of a valid 0x03 ciphertext "
            "(0x03 needs at least 22)", "truncated", "empty", e[:n])
    names = [c["name"] for c in cases + neg]
    assert len(names) == len(set(names)), "duplicate case names"
    return {
        "algorithm": ALG_SIV,
        "description": (
            "phiseal format v1, algorithm 0x03: deterministic AES-256-SIV (RFC 5297) under a key "
            "derived per tenant key version and field (docs/FORMAT.md §3.3). `cases` are positive; "
            "`negative_cases` must fail with `expect`, in the vocabulary of negative.json."
        ),
        "cases": cases,
        "expect_values": ["decryption_failed", "truncated"],
        "negative_cases": neg,
    }


# (name, description, tenant, version, field, normalisation, bits, value)
INDEX_CASES = [
    ("ssn-digits-256", "SSN with dashes, digits_only, 256 bits",
     "acme", 1, "ssn", "digits_only", 256, b"078-05-1120"),
    ("ssn-digits-256-plain", "the same SSN without dashes: the same index",
     "acme", 1, "ssn", "digits_only", 256, SSN),
    ("ssn-digits-32", "the same SSN, 32 bits: not a prefix of the 256-bit index (bits are MAC input)",
     "acme", 1, "ssn", "digits_only", 32, b"078 05 1120"),
    ("ssn-digits-16", "16 bits (the minimum)",
     "acme", 1, "ssn", "digits_only", 16, SSN),
    ("ssn-digits-24", "24 bits",
     "acme", 1, "ssn", "digits_only", 24, SSN),
    ("ssn-digits-v2", "the same SSN under key version 2: unrelated",
     "acme", 2, "ssn", "digits_only", 256, SSN),
    ("ssn-digits-field-mrn", "the same value under field mrn: unrelated",
     "acme", 1, "mrn", "digits_only", 256, SSN),
    ("ssn-digits-globex", "the same value under tenant globex: unrelated",
     "globex", 1, "ssn", "digits_only", 256, SSN),
    ("ssn-exact", "the same digits with exact normalisation: unrelated (normalisation is MAC input)",
     "acme", 1, "ssn", "exact", 256, SSN),
    ("phone-digits-64", "phone number with punctuation, non-ASCII digits dropped, 64 bits",
     "acme", 1, "phone", "digits_only", 64, "+1 (555) 010-9999 ٣".encode()),
    ("name-case-folded-upper", "ZOË SMITH, case_folded, 64 bits",
     "acme", 1, "last_name", "case_folded", 64, "ZOË SMITH".encode()),
    ("name-case-folded-lower", "zoë smith: the same index as ZOË SMITH",
     "acme", 1, "last_name", "case_folded", 64, "zoë smith".encode()),
    ("name-case-folded-v2", "zoë smith under key version 2, 128 bits",
     "acme", 2, "last_name", "case_folded", 128, "zoë smith".encode()),
    ("greek-final-sigma", "ΟΔΟΣ lowercases to οδος (word-final sigma), 64 bits",
     "globex", 1, "last_name", "case_folded", 64, "ΟΔΟΣ".encode()),
    ("dotted-capital-i", "İ lowercases to i + U+0307 (lengthening mapping), 64 bits",
     "globex", 1, "last_name", "case_folded", 64, "İstanbul".encode()),
    ("sharp-s-not-folded", "Straße: ß stays ß (lowercasing, not case folding), 64 bits",
     "globex", 1, "last_name", "case_folded", 64, "STRAßE".encode()),
    ("nfd-not-normalised", "e + U+0301 (NFD é): no Unicode normalisation, 64 bits",
     "globex", 1, "last_name", "case_folded", 64, "Zoe\u0301".encode()),
    ("exact-bytes", "exact: arbitrary bytes, not UTF-8, 256 bits",
     "acme", 1, "token", "exact", 256, bytes.fromhex("00ff80c3")),
    ("exact-empty", "exact: empty value, 128 bits",
     "acme", 1, "token", "exact", 128, b""),
    ("exact-case-kept", "exact keeps case: Zoë differs from zoë, 64 bits",
     "acme", 1, "last_name", "exact", 64, "Zoë Smith".encode()),
]

# (name, description, normalisation, bits, value): every one is refused with invalid_input.
INDEX_INVALID = [
    ("digits-only-no-digit", "digits_only leaves nothing", "digits_only", 64, b"n/a"),
    ("digits-only-empty", "digits_only of an empty value", "digits_only", 64, b""),
    ("digits-only-arabic-indic", "non-ASCII digits are dropped, leaving nothing",
     "digits_only", 64, "٣٤".encode()),
    ("case-folded-not-utf8", "case_folded needs UTF-8", "case_folded", 64, bytes.fromhex("5aff")),
    ("bits-8", "8 bits: below the minimum of 16", "exact", 8, b"x"),
    ("bits-0", "0 bits", "exact", 0, b"x"),
    ("bits-20", "20 bits: not a multiple of 8", "exact", 20, b"x"),
    ("bits-264", "264 bits: above the maximum of 256", "exact", 264, b"x"),
]


def build_blind_index() -> dict:
    cases = []
    for name, desc, tenant, v, field, norm, bits, value in INDEX_CASES:
        tk = version_key(tenant, v)
        index, normalised, mac_input, key = blind_index(tk, field, norm, bits, value)
        cases.append({
            "name": name,
            "description": desc,
            "tenant_key": tk.hex(),
            "key_version": v,
            "context": {"tenant": tenant, "field": field},
            "normalization": norm,
            "bits": bits,
            "value": value.hex(),
            "normalized": normalised.hex(),
            "index_key": key.hex(),
            "mac_input": mac_input.hex(),
            "index": index.hex(),
        })
    by = {c["name"]: c["index"] for c in cases}
    assert by["ssn-digits-256"] == by["ssn-digits-256-plain"]
    assert by["name-case-folded-upper"] == by["name-case-folded-lower"]
    assert not by["ssn-digits-256"].startswith(by["ssn-digits-32"])
    for other in ("ssn-digits-v2", "ssn-digits-field-mrn", "ssn-digits-globex", "ssn-exact"):
        assert by["ssn-digits-256"] != by[other]
    assert by["exact-case-kept"] != by["name-case-folded-lower"]
    invalid = []
    for name, desc, norm, bits, value in INDEX_INVALID:
        refused = not (bits % 8 == 0 and 16 <= bits <= 256) or normalize(norm, value) is None
        assert refused, name
        invalid.append({
            "name": name,
            "description": desc,
            "expect": "invalid_input",
            "tenant_key": version_key("acme", 1).hex(),
            "context": {"tenant": "acme", "field": "ssn"},
            "normalization": norm,
            "bits": bits,
            "value": value.hex(),
        })
    names = [c["name"] for c in cases + invalid]
    assert len(names) == len(set(names)), "duplicate case names"
    return {
        "description": (
            "phiseal blind indexes (docs/FORMAT.md §9): HMAC-SHA256 under a key derived per tenant "
            "key version and field, over u8 normalisation id ‖ u16be bits ‖ normalised value, "
            "truncated to bits/8 bytes. `cases` are positive (`normalized`, `index_key` and "
            "`mac_input` are intermediate values); `invalid_cases` must be refused."
        ),
        "normalizations": NORMALIZATIONS,
        "cases": cases,
        "invalid_cases": invalid,
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


# ---------------------------------------------------------------------------------------------
# Streams (docs/FORMAT.md §10): STREAM segments of AES-256-GCM under an HKDF-SHA256 stream key
# ---------------------------------------------------------------------------------------------

from cryptography.exceptions import InvalidTag  # noqa: E402 (kept with the stream section)

STREAM_FORMAT = 0x53  # §10.1
STREAM_ALG = 0x01  # §10.1
STREAM_INFO = b"phiseal stream v1 aes-256-gcm-hkdf key"  # §10.2
STREAM_HEADER_LEN = 49
STREAM_TAG_LEN = 16
STREAM_MIN_SEGMENT, STREAM_MAX_SEGMENT = 4096, 16 * 1024 * 1024
STREAM_EXPECT = [
    "decryption_failed", "truncated", "unknown_version", "unknown_algorithm",
    "zero_key_version", "bad_segment_size",
]


class StreamReject(Exception):
    """A stream the reader of §10.3 refuses; `args[0]` is the error name."""


def stream_header(key_version: int, segment_size: int, salt: bytes, prefix: bytes) -> bytes:
    """§10.1: 0x53 ‖ 0x01 ‖ u32be V ‖ u32be S ‖ salt (32) ‖ nonce prefix (7)."""
    assert 1 <= key_version <= 0xFFFFFFFF
    assert STREAM_MIN_SEGMENT <= segment_size <= STREAM_MAX_SEGMENT
    assert len(salt) == 32 and len(prefix) == 7
    return bytes([STREAM_FORMAT, STREAM_ALG]) + struct.pack(">II", key_version, segment_size) + salt + prefix


def stream_key(tk: bytes, salt: bytes, ctx: bytes) -> bytes:
    """§10.2: HKDF-SHA256(TK, salt, "phiseal stream v1 aes-256-gcm-hkdf key" ‖ context)."""
    return hkdf_sha256(tk, salt, STREAM_INFO + ctx, 32)


def stream_nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    """§10.2: P ‖ u32be(i) ‖ (0x01 if last else 0x00)."""
    assert 0 <= counter <= 0xFFFFFFFF
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def stream_seal(tk: bytes, key_version: int, segment_size: int, salt: bytes, prefix: bytes,
                ctx: bytes, pt: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """Returns (whole stream, stream key, sealed segments)."""
    header = stream_header(key_version, segment_size, salt, prefix)
    key = stream_key(tk, salt, ctx)
    pieces = [pt[i:i + segment_size] for i in range(0, len(pt), segment_size)] or [b""]
    segments = [
        AESGCM(key).encrypt(stream_nonce(prefix, i, i == len(pieces) - 1), piece, header)
        for i, piece in enumerate(pieces)
    ]
    return header + b"".join(segments), key, segments


def stream_open(tk: bytes, ctx: bytes, data: bytes) -> bytes:
    """The reader of §10.3, step by step; raises StreamReject(error name)."""
    if len(data) < STREAM_HEADER_LEN:
        raise StreamReject("truncated")
    if data[0] != STREAM_FORMAT:
        raise StreamReject("unknown_version")
    if data[1] != STREAM_ALG:
        raise StreamReject("unknown_algorithm")
    key_version, segment_size = struct.unpack(">II", data[2:10])
    if key_version == 0:
        raise StreamReject("zero_key_version")
    if not STREAM_MIN_SEGMENT <= segment_size <= STREAM_MAX_SEGMENT:
        raise StreamReject("bad_segment_size")
    header, salt, prefix = data[:STREAM_HEADER_LEN], data[10:42], data[42:49]
    aead = AESGCM(stream_key(tk, salt, ctx))
    body, pos, counter, out = data[STREAM_HEADER_LEN:], 0, 0, b""
    full = segment_size + STREAM_TAG_LEN
    while True:
        remaining = len(body) - pos
        last = remaining <= full  # a full segment is non-final only if more bytes follow
        if last and remaining < STREAM_TAG_LEN:
            raise StreamReject("truncated")
        chunk = body[pos:] if last else body[pos:pos + full]
        try:
            out += aead.decrypt(stream_nonce(prefix, counter, last), chunk, header)
        except InvalidTag:
            raise StreamReject("decryption_failed") from None
        if last:
            return out
        pos, counter = pos + full, counter + 1


STREAM_POSITIVE = [
    # name, description, tenant, field, record, key version, segment size, plaintext length
    ("empty", "empty plaintext: the header and one final segment of 0 bytes", "acme", "scan", None, 1, 4096, 0),
    ("one-byte", "1 byte: one final segment", "acme", "scan", None, 1, 4096, 1),
    ("one-partial-segment-record", "1000 bytes, with a record id", "acme-health", "discharge-summary",
     "patient/42", 7, 4096, 1000),
    ("exactly-one-segment", "exactly one segment (4096 bytes): one full final segment, no empty one",
     "acme", "scan", None, 2, 4096, 4096),
    ("exact-multiple", "exactly two segments (2 × 4096 bytes): the final segment is full", "acme", "scan",
     "r1", 3, 4096, 2 * 4096),
    ("several-segments", "2 × 4096 + 1000 bytes: two full segments and a partial final one, UTF-8 record id",
     "tenant-b", "report", "дело-7", 4000000000,
     4096, 2 * 4096 + 1000),
    ("default-segment-size", "5000 bytes with the default segment size (65536): one segment", "acme",
     "export", None, 0xFFFFFFFF, 65536, 5000),
    ("segment-size-5000", "a segment size that is not a power of two (5000), 5100 bytes: 2 segments",
     "acme", "scan", None, 1, 5000, 5100),
]


def build_stream() -> dict:
    cases, raw = [], {}
    for name, desc, tenant, field, record, kv, seg, ptlen in STREAM_POSITIVE:
        tk = tenant_key(f"stream/{name}")
        salt, prefix = det(f"stream/salt/{name}", 32), det(f"stream/prefix/{name}", 7)
        pt = det(f"stream/plaintext/{name}", ptlen)
        ctx = context_bytes(tenant, field, record)
        data, key, segments = stream_seal(tk, kv, seg, salt, prefix, ctx, pt)
        assert len(data) == STREAM_HEADER_LEN + ptlen + STREAM_TAG_LEN * max(1, -(-ptlen // seg))
        assert stream_open(tk, ctx, data) == pt
        cases.append({
            "name": name,
            "description": desc,
            "tenant_key": tk.hex(),
            "key_version": kv,
            "context": {"tenant": tenant, "field": field, "record": record},
            "segment_size": seg,
            "salt": salt.hex(),
            "nonce_prefix": prefix.hex(),
            "plaintext": pt.hex(),
            "stream_key": key.hex(),
            "header": data[:STREAM_HEADER_LEN].hex(),
            "segments": len(segments),
            "stream": data.hex(),
        })
        raw[name] = {"tk": tk, "ctx": (tenant, field, record), "kv": kv, "seg": seg, "salt": salt,
                     "prefix": prefix, "pt": pt, "data": data, "segments": segments}
    # §10.1 worked sizes: the empty stream is 65 bytes.
    if len(raw["empty"]["data"]) != 65:
        sys.exit("FATAL: empty stream size disagrees with FORMAT.md §10.1")

    negative: list[dict] = []

    def add(name: str, desc: str, expect: str, src: str, data: bytes, tk: bytes | None = None,
            ctx: tuple | None = None) -> None:
        base = raw[src]
        tk = base["tk"] if tk is None else tk
        ctx = base["ctx"] if ctx is None else ctx
        try:
            stream_open(tk, context_bytes(*ctx), data)
            sys.exit(f"FATAL: negative stream case {name} decrypts")
        except StreamReject as e:
            if e.args[0] != expect:
                sys.exit(f"FATAL: negative stream case {name}: {e.args[0]}, expected {expect}")
        negative.append({
            "name": name,
            "description": desc,
            "expect": expect,
            "derived_from": f"stream.json#{src}",
            "tenant_key": tk.hex(),
            "context": {"tenant": ctx[0], "field": ctx[1], "record": ctx[2]},
            "stream": data.hex(),
        })

    s = raw["several-segments"]
    h, (s0, s1, s2) = s["data"][:STREAM_HEADER_LEN], s["segments"]
    add("truncated-final-segment-dropped", "the final segment removed (truncation at a segment boundary)",
        "decryption_failed", "several-segments", h + s0 + s1)
    add("truncated-to-first-segment", "only the first segment kept", "decryption_failed",
        "several-segments", h + s0)
    add("reordered-segments", "segments 0 and 1 swapped", "decryption_failed", "several-segments",
        h + s1 + s0 + s2)
    add("duplicated-segment", "segment 0 repeated", "decryption_failed", "several-segments",
        h + s0 + s0 + s1 + s2)
    add("inner-segment-dropped", "segment 1 removed", "decryption_failed", "several-segments", h + s0 + s2)
    # Another stream: same tenant key, context, key version and segment size, its own salt/prefix.
    other, _, (o0, o1, o2) = stream_seal(s["tk"], s["kv"], s["seg"], det("stream/salt/other", 32),
                                         det("stream/prefix/other", 7), context_bytes(*s["ctx"]), s["pt"])
    add("segment-from-another-stream", "segment 1 replaced by segment 1 of another stream of the same "
        "plaintext under the same tenant key and context (another salt and nonce prefix)",
        "decryption_failed", "several-segments", h + s0 + o1 + s2)
    add("header-from-another-stream", "the header of another stream of the same plaintext",
        "decryption_failed", "several-segments", other[:STREAM_HEADER_LEN] + s0 + s1 + s2)
    e = raw["exactly-one-segment"]
    eh, (e0,) = e["data"][:STREAM_HEADER_LEN], e["segments"]
    ekey = stream_key(e["tk"], e["salt"], context_bytes(*e["ctx"]))
    extra = AESGCM(ekey).encrypt(stream_nonce(e["prefix"], 1, True), b"appended", eh)
    add("extended-after-final", "a validly sealed segment 1 (flag last) appended after the final segment",
        "decryption_failed", "exactly-one-segment", e["data"] + extra)
    add("extended-by-tag-length", "16 zero bytes appended after the final segment", "decryption_failed",
        "exactly-one-segment", e["data"] + bytes(16))
    add("extended-by-one-byte", "1 byte appended after the final segment", "decryption_failed",
        "one-partial-segment-record", raw["one-partial-segment-record"]["data"] + b"\x00")
    add("final-flag-on-inner-segment", "a stream whose only segment was sealed as non-final (flag 0x00)",
        "decryption_failed", "exactly-one-segment",
        eh + AESGCM(ekey).encrypt(stream_nonce(e["prefix"], 0, False), e["pt"], eh))
    p = raw["one-partial-segment-record"]
    pd = p["data"]
    for label, index in (("key-version", 5), ("segment-size", 8), ("salt", 10), ("nonce-prefix", 48)):
        add(f"header-{label}-altered", f"one bit of the header's {label.replace('-', ' ')} flipped "
            "(the header stays well-formed)", "decryption_failed", "one-partial-segment-record",
            flip(pd, index))
    add("ciphertext-altered", "one bit of the first ciphertext byte flipped", "decryption_failed",
        "one-partial-segment-record", flip(pd, STREAM_HEADER_LEN))
    add("tag-altered", "one bit of the last tag byte flipped", "decryption_failed",
        "one-partial-segment-record", flip(pd, len(pd) - 1, 7))
    add("inner-tag-altered", "one bit of segment 0's tag flipped", "decryption_failed", "several-segments",
        flip(s["data"], STREAM_HEADER_LEN + s["seg"] + STREAM_TAG_LEN - 1))
    add("wrong-field", "decrypted with another field name", "decryption_failed",
        "one-partial-segment-record", pd, ctx=(p["ctx"][0], "admission-note", p["ctx"][2]))
    add("wrong-record", "decrypted with another record id", "decryption_failed",
        "one-partial-segment-record", pd, ctx=(p["ctx"][0], p["ctx"][1], "patient/43"))
    add("record-absent", "decrypted without the record id", "decryption_failed",
        "one-partial-segment-record", pd, ctx=(p["ctx"][0], p["ctx"][1], None))
    add("wrong-tenant-key", "decrypted with another tenant key", "decryption_failed",
        "one-partial-segment-record", pd, tk=tenant_key("stream/other"))
    m = raw["empty"]["data"]
    add("header-only", "the empty stream without its final segment (the header alone)", "truncated",
        "empty", m[:STREAM_HEADER_LEN])
    add("header-cut", "48 of the 49 header bytes", "truncated", "empty", m[:STREAM_HEADER_LEN - 1])
    add("final-tag-cut", "the empty stream with 15 of its 16 tag bytes", "truncated", "empty", m[:-1])
    x = raw["exact-multiple"]["data"]
    add("cut-after-full-segment", "one full segment and 10 bytes of the second",
        "truncated", "exact-multiple", x[:STREAM_HEADER_LEN + 4096 + STREAM_TAG_LEN + 10])
    for v in (0x01, 0x52, 0x00):
        add(f"stream-format-{v:02x}", f"stream format byte 0x{v:02x}", "unknown_version", "one-byte",
            bytes([v]) + raw["one-byte"]["data"][1:])
    for a in (0x00, 0x02, 0xFF):
        add(f"stream-algorithm-{a:02x}", f"algorithm id 0x{a:02x}", "unknown_algorithm", "one-byte",
            raw["one-byte"]["data"][:1] + bytes([a]) + raw["one-byte"]["data"][2:])
    ob = raw["one-byte"]["data"]
    add("stream-key-version-zero", "key version 0", "zero_key_version", "one-byte",
        ob[:2] + bytes(4) + ob[6:])
    for size in (0, 4095, 16 * 1024 * 1024 + 1, 0xFFFFFFFF):
        add(f"segment-size-{size}", f"segment size {size}", "bad_segment_size", "one-byte",
            ob[:6] + struct.pack(">I", size) + ob[10:])
    names = [c["name"] for c in negative]
    assert len(names) == len(set(names)), "duplicate stream case names"
    for expect in STREAM_EXPECT:
        assert any(c["expect"] == expect for c in negative), expect
    return {
        "description": (
            "phiseal streams (docs/FORMAT.md §10): STREAM segments of AES-256-GCM under an HKDF-SHA256 "
            "per-stream key. `cases`: a conforming writer given tenant_key, key_version, context, "
            "segment_size, salt, nonce_prefix and plaintext outputs exactly `stream`; a reader given "
            "tenant_key, context and `stream` outputs plaintext. `negative`: every reader must reject "
            "`stream` (decrypted with `tenant_key` and `context`) with the error `expect`."
        ),
        "expect_values": STREAM_EXPECT,
        "cases": cases,
        "negative": negative,
    }


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
    siv_self_test()
    siv = build_siv()
    # §2 table: 0x03 has a 22-byte header and overhead (no trailing tag).
    empty = next(c for c in siv["cases"] if c["name"] == "empty")
    if len(bytes.fromhex(empty["ciphertext"])) != 22:
        sys.exit("FATAL: overhead of 0x03 disagrees with FORMAT.md §2")
    # §3.3 example: a 9-digit SSN is 31 bytes binary, 47 characters as text.
    ssn = next(c for c in siv["cases"] if c["name"] == "ssn-acme-v1")
    if len(bytes.fromhex(ssn["ciphertext"])) != 31 or len(ssn["text"]) != 47:
        sys.exit("FATAL: sizes disagree with the example in FORMAT.md §3.3")
    # §9 example: digits_only of "078-05-1120" at 32 bits.
    _, _, mac_input, _ = blind_index(version_key("acme", 1), "ssn", "digits_only", 32,
                                     b"078-05-1120")
    if mac_input.hex(" ") != "03 00 20 30 37 38 30 35 31 31 32 30":
        sys.exit("FATAL: blind-index MAC input disagrees with the example in FORMAT.md §9")
    files["aes-256-siv.json"] = render(siv)
    files["blind-index.json"] = render(build_blind_index())
    files["stream.json"] = render(build_stream())
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
