#!/usr/bin/env python3
"""Encrypts a (fake) patient record field by field through `phiseald`, then decrypts it.

    patient_record.py --socket PATH [--tenant T] [--create-tenant]

A service token, if needed, is read from the environment variable PHISEAL_TOKEN (not a
command-line argument, which other users could see in the process list).

1. encrypts every field with ONE EncryptBatch call, each under the context
   (tenant, field name, surrogate patient id), and prints the record in `phs1:` text form;
2. decrypts the text forms with ONE DecryptBatch call and checks every value round-trips;
3. shows that the ssn ciphertext decrypted under the field name "name" is refused with
   INVALID_ARGUMENT, kind `decryption_failed` (the context is authenticated);
4. makes the MRN searchable (deterministic encryption) and the SSN too (a blind index of its
   digits), and finds both again from a query value with SearchTerms;
5. streams a 1 MiB synthetic scanned referral through EncryptStream and DecryptStream, and
   shows a truncated copy refused.

Only ciphertexts, field names and the surrogate id are printed, never a plaintext value.
Exits 0 only if every check passes, with `python client: ok` as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import grpc

import phiseal_client
from phiseal_client import Context, Phiseal, PhisealError

# Synthetic data: no real person. 078-05-1120 is the well-known never-valid "Woolworth" SSN.
PATIENT_ID = "pt-7f3c9a52"  # a surrogate key, not PHI: it goes to the audit log
RECORD = {
    "mrn": "MRN-00417723",
    "name": "Jane Q. Testpatient",
    "ssn": "078-05-1120",
    "date_of_birth": "1961-04-12",
    "diagnosis": "E11.9 Type 2 diabetes mellitus without complications",
    "notes": "Synthetic note: follow up in 3 months; HbA1c 7.1 % (détente ✓).",
}


class CheckFailed(Exception):
    """A demo check did not hold (the message names the field, never its value)."""


def run(client: Phiseal, tenant: str, create_tenant: bool) -> None:
    """Runs the demo against a connected client; raises on the first failed check."""
    if create_tenant:
        try:
            print(f"created tenant {tenant}: key version {client.create_tenant(tenant)}")
        except PhisealError as e:
            if e.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            print(f"tenant {tenant} exists already ({e.kind})")

    contexts = {field: Context(tenant, field, PATIENT_ID) for field in RECORD}
    encrypted = client.encrypt_batch(
        [(contexts[f], value.encode("utf-8")) for f, value in RECORD.items()])
    record: dict[str, str] = {}
    for field, result in zip(RECORD, encrypted, strict=True):
        if isinstance(result, PhisealError):
            raise CheckFailed(f"encrypting field {field} failed: {result}")
        record[field] = phiseal_client.to_text(result)
    print(f"encrypted record ({len(record)} fields, one EncryptBatch call):")
    print(json.dumps({"patient_id": PATIENT_ID, **record}, indent=2))

    decrypted = client.decrypt_batch(
        [(contexts[f], phiseal_client.from_text(text)) for f, text in record.items()])
    for field, result in zip(RECORD, decrypted, strict=True):
        if isinstance(result, PhisealError):
            raise CheckFailed(f"decrypting field {field} failed: {result}")
        if result.decode("utf-8") != RECORD[field]:
            raise CheckFailed(f"field {field} did not round-trip")
    print(f"decrypted all {len(record)} fields with one DecryptBatch call: every value round-trips")

    # One bad item fails alone, and names the batch's request id (as in the audit log).
    mixed = client.decrypt_batch([
        (contexts["mrn"], phiseal_client.from_text(record["mrn"])),
        (Context("no-such-tenant", "mrn", PATIENT_ID), phiseal_client.from_text(record["mrn"])),
    ])
    if not (isinstance(mixed[0], bytes) and isinstance(mixed[1], PhisealError)
            and mixed[1].kind == "tenant_not_found" and mixed[1].request_id):
        raise CheckFailed("a batch with one bad item did not fail that item alone, with the "
                          "batch's request id")
    print(f"a batch item of an unknown tenant failed alone: {mixed[1].kind} "
          f"(request id {mixed[1].request_id})")

    ssn = phiseal_client.from_text(record["ssn"])
    try:
        client.decrypt(contexts["name"], ssn)
    except PhisealError as e:
        if (e.code, e.kind) != (grpc.StatusCode.INVALID_ARGUMENT, "decryption_failed"):
            raise CheckFailed(f"ssn under field 'name': expected INVALID_ARGUMENT "
                              f"decryption_failed, got {e.code.name} {e.kind}") from None
        print(f"ssn ciphertext under field 'name' refused: {e}")
    else:
        raise CheckFailed("ssn ciphertext decrypted under field 'name'")

    # Searchable columns: no record id in these contexts (equal values must match).
    mrn_column = Context(tenant, "mrn_lookup")
    stored_mrn = client.encrypt_deterministic(mrn_column, RECORD["mrn"].encode())
    terms = client.search_terms_deterministic(mrn_column, RECORD["mrn"].encode())
    if stored_mrn not in terms:
        raise CheckFailed("the MRN lookup did not find the stored deterministic ciphertext")
    ssn_column = Context(tenant, "ssn_index")
    stored_index = client.blind_index(ssn_column, RECORD["ssn"].encode(), "digits_only", 32)
    query = client.search_terms_blind_index(ssn_column, b"078 05 1120", "digits_only", 32)
    if stored_index not in query:
        raise CheckFailed("the SSN blind-index lookup did not find the stored index")
    print(f"searchable: MRN found among {len(terms)} deterministic term(s), SSN among "
          f"{len(query)} blind index(es) of {len(stored_index) * 8} bits")

    # A large document, streamed both ways in 64 KiB chunks.
    document = bytes((i * 2654435761 >> 13) & 0xFF for i in range(1024 * 1024))
    referral = Context(tenant, "referral_scan", PATIENT_ID)
    chunks = [document[i:i + 65536] for i in range(0, len(document), 65536)]
    sealed = b"".join(client.encrypt_stream(referral, chunks))
    opened = b"".join(client.decrypt_stream(referral, [sealed[i:i + 65536]
                                                        for i in range(0, len(sealed), 65536)]))
    if opened != document:
        raise CheckFailed("the streamed referral did not round-trip")
    try:
        for _ in client.decrypt_stream(referral, [sealed[:-1]]):
            pass
    except PhisealError as e:
        if e.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise CheckFailed(f"truncated stream: expected INVALID_ARGUMENT, got {e.code.name}")
        print(f"streamed a {len(document)}-byte referral ({len(sealed)} bytes sealed) both ways; "
              f"a truncated copy was refused: {e.kind}")
    else:
        raise CheckFailed("a truncated stream decrypted without error")


def main() -> int:
    """Parses the arguments, generates the stubs into a temporary directory and runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="phiseald's Unix socket")
    parser.add_argument("--tenant", default="clinic-demo", help="tenant id (default: clinic-demo)")
    parser.add_argument("--create-tenant", action="store_true",
                        help="create the tenant first (one that exists already is fine)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="phiseal-stubs-") as out_dir:
        phiseal_client.generate(out_dir)
        try:
            with Phiseal(args.socket, os.environ.get("PHISEAL_TOKEN")) as client:
                run(client, args.tenant, args.create_tenant)
        except (PhisealError, CheckFailed, ValueError) as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    print("python client: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
