"""A small Python client for the phiseal sidecar (`phiseald`) on its Unix socket.

The gRPC stubs are generated from `proto/phiseal/v1/phiseal.proto` at run time by
`generate()`, never committed, so they cannot drift from the contract. Call `generate()`
once before creating a `Phiseal`.

Errors come back as `PhisealError`, carrying the gRPC status code and the daemon's stable
`phiseal-error-kind`. The daemon's messages never contain plaintext, ciphertext or key
bytes, and neither do the messages raised here.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

import grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"
PROTO_FILE = "phiseal/v1/phiseal.proto"
PB2_MODULE = "phiseal.v1.phiseal_pb2"
PB2_GRPC_MODULE = "phiseal.v1.phiseal_pb2_grpc"
ERROR_KIND_KEY = "phiseal-error-kind"
REQUEST_ID_KEY = "x-request-id"
TEXT_PREFIX = "phs1:"
DEFAULT_TIMEOUT_SECONDS = 10.0
# grpc-python sends the socket path as `:authority` on a unix: channel; the h2 crate under
# tonic rejects that authority and resets every stream (RST_STREAM, PROTOCOL_ERROR), so
# send `localhost` as grpc-go and tonic's own client do (see hyperium/h2#487).
CHANNEL_OPTIONS = (
    ("grpc.default_authority", "localhost"),
    # Answers up to the daemon's limits.max_message_bytes, which may be raised above grpc's
    # 4 MiB default (the daemon refuses larger ones itself: response_too_large).
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # A daemon that stops answering (stopped, wedged) is noticed on an open stream too: a
    # ping every 30 s, 10 s to answer.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def generate(out_dir: str | Path) -> tuple[ModuleType, ModuleType]:
    """Generates the Python stubs for the phiseal proto into `out_dir` and imports them.

    Runs `python -m grpc_tools.protoc` (which adds the well-known types such as
    `google/protobuf/timestamp.proto` to the include path itself), puts `out_dir` first on
    `sys.path` (the generated code imports `phiseal.v1.phiseal_pb2` absolutely) and returns
    the modules `(phiseal_pb2, phiseal_pb2_grpc)`.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_ROOT / PROTO_FILE),
        ],
        check=True,
    )
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return importlib.import_module(PB2_MODULE), importlib.import_module(PB2_GRPC_MODULE)


def to_text(ciphertext: bytes) -> str:
    """The `phs1:` text form of a binary ciphertext (base64url without padding)."""
    return TEXT_PREFIX + base64.urlsafe_b64encode(ciphertext).rstrip(b"=").decode("ascii")


def from_text(text: str) -> bytes:
    """The binary ciphertext of a `phs1:` text form; rejects any non-canonical spelling."""
    body = text[len(TEXT_PREFIX):] if text.startswith(TEXT_PREFIX) else None
    if body is None or not _BASE64URL.fullmatch(body):
        raise ValueError("not a phs1: ciphertext")
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except binascii.Error:
        raise ValueError("not a phs1: ciphertext") from None
    if to_text(data) != text:
        raise ValueError("non-canonical phs1: ciphertext")
    return data


@dataclass(frozen=True)
class Context:
    """An encryption context: tenant, field name and optional (opaque, non-PHI) record id."""

    tenant: str
    field: str
    record: str | None = None


class PhisealError(Exception):
    """A refused call or batch item: gRPC status code, `phiseal-error-kind` and a safe message."""

    def __init__(self, code: grpc.StatusCode, kind: str | None, message: str,
                 request_id: str | None = None) -> None:
        super().__init__(f"{code.name} ({kind or 'no kind'}): {message}")
        self.code = code
        self.kind = kind
        self.message = message
        self.request_id = request_id  # the daemon's `x-request-id`, as in its audit log

    @classmethod
    def from_rpc_error(cls, error: Any) -> PhisealError:
        """Converts a failed call (a `grpc.RpcError` that is also a `grpc.Call`). tonic
        sends an error as a trailers-only response, so grpc-python reports the kind in the
        trailing metadata; initial metadata is checked too, in case a server puts it there."""
        metadata = dict([*(error.initial_metadata() or ()), *(error.trailing_metadata() or ())])
        return cls(error.code(), metadata.get(ERROR_KIND_KEY), error.details() or "",
                   metadata.get(REQUEST_ID_KEY))

    @classmethod
    def from_item_error(cls, item: Any, request_id: str | None = None) -> PhisealError:
        """Converts the `ItemError` message of one failed batch item (`request_id`: the
        batch call's, under which the daemon audited every item)."""
        codes = (c for c in grpc.StatusCode if c.value[0] == item.code)
        code = next(codes, grpc.StatusCode.UNKNOWN)
        return cls(code, item.kind or None, item.message, request_id)


def _checked_token(token: str) -> str:
    """The token without surrounding whitespace (a secret written with `echo` ends in a
    newline), as the `phiseal` CLI takes it; refused, without showing it, unless it is visible
    ASCII only: gRPC would otherwise put the invalid metadata, token included, in its error."""
    token = token.strip()
    if not token or not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the service token is not valid (only visible ASCII characters are "
                         "allowed); check PHISEAL_TOKEN")
    return token


class Phiseal:
    """A connection to `phiseald`: the FieldService and AdminService calls used by the examples.

    Sends `authorization: Bearer <token>` if a token is given; otherwise the daemon knows the
    caller by its Unix peer credentials. Use as a context manager, or call `close()`.
    """

    def __init__(self, socket_path: str, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._pb2 = importlib.import_module(PB2_MODULE)  # after generate()
        stubs = importlib.import_module(PB2_GRPC_MODULE)
        self._channel = grpc.insecure_channel("unix:" + socket_path, options=CHANNEL_OPTIONS)
        self._field = stubs.FieldServiceStub(self._channel)
        self._admin = stubs.AdminServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {_checked_token(token)}"),) if token else ()
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise PhisealError.from_rpc_error(error) from None

    def _batch(self, method: grpc.UnaryUnaryMultiCallable, request: Any, sent: int,
               ok: Any) -> list[Any]:
        """Runs a batch call: one result per item, in order, `ok(result)` for a success and
        a `PhisealError` carrying the call's request id for an item that failed alone."""
        try:
            response, call = method.with_call(request, metadata=self._metadata,
                                              timeout=self._timeout)
        except grpc.RpcError as error:
            raise PhisealError.from_rpc_error(error) from None
        request_id = dict(call.initial_metadata() or ()).get(REQUEST_ID_KEY)
        results = response.results
        if len(results) != sent:
            # Never pair results with the wrong items.
            raise PhisealError(grpc.StatusCode.INTERNAL, "result_count",
                               f"{len(results)} results for {sent} items", request_id)
        return [ok(r) if r.HasField("ok") else PhisealError.from_item_error(r.error, request_id)
                for r in results]

    def _context(self, context: Context) -> Any:
        return self._pb2.Context(tenant=context.tenant, field=context.field, record=context.record)

    def create_tenant(self, tenant: str) -> int:
        """Creates a tenant; returns its first key version. ALREADY_EXISTS if it exists."""
        request = self._pb2.CreateTenantRequest(tenant=tenant)
        return int(self._call(self._admin.CreateTenant, request).key_version)

    def encrypt(self, context: Context, plaintext: bytes) -> bytes:
        """Encrypts one field; returns the binary ciphertext."""
        request = self._pb2.EncryptRequest(context=self._context(context), plaintext=plaintext)
        return bytes(self._call(self._field.Encrypt, request).ciphertext)

    def decrypt(self, context: Context, ciphertext: bytes) -> bytes:
        """Decrypts one field; raises `PhisealError` (e.g. `decryption_failed`) if refused."""
        request = self._pb2.DecryptRequest(context=self._context(context), ciphertext=ciphertext)
        return bytes(self._call(self._field.Decrypt, request).plaintext)

    def encrypt_batch(self, items: Sequence[tuple[Context, bytes]]) -> list[bytes | PhisealError]:
        """Encrypts many fields in one call. One result per item, in order: the ciphertext,
        or the `PhisealError` (not raised) of an item that failed alone."""
        request = self._pb2.EncryptBatchRequest(items=[
            self._pb2.EncryptRequest(context=self._context(c), plaintext=p) for c, p in items])
        return self._batch(self._field.EncryptBatch, request, len(items),
                           lambda r: bytes(r.ok.ciphertext))

    def decrypt_batch(self, items: Sequence[tuple[Context, bytes]]) -> list[bytes | PhisealError]:
        """Decrypts many fields in one call. One result per item, in order: the plaintext,
        or the `PhisealError` (not raised) of an item that failed alone."""
        request = self._pb2.DecryptBatchRequest(items=[
            self._pb2.DecryptRequest(context=self._context(c), ciphertext=t) for c, t in items])
        return self._batch(self._field.DecryptBatch, request, len(items),
                           lambda r: bytes(r.ok.plaintext))

    def encrypt_deterministic(self, context: Context, plaintext: bytes) -> bytes:
        """Deterministic encryption (equal values, equal ciphertexts) for equality lookups;
        the context must have no record id. Reveals which rows are equal (docs/SEARCH.md)."""
        request = self._pb2.EncryptRequest(context=self._context(context), plaintext=plaintext)
        return bytes(self._call(self._field.EncryptDeterministic, request).ciphertext)

    def search_terms_deterministic(self, context: Context, value: bytes) -> list[bytes]:
        """The deterministic ciphertexts of `value` under every live key version, primary
        first: what goes into `WHERE column IN (...)`."""
        request = self._pb2.SearchTermsRequest(
            context=self._context(context), value=value,
            deterministic=self._pb2.DeterministicTerms())
        return [bytes(t.value) for t in self._call(self._field.SearchTerms, request).terms]

    def _spec(self, normalization: str, bits: int) -> Any:
        names = {"exact": self._pb2.NORMALIZATION_EXACT,
                 "case_folded": self._pb2.NORMALIZATION_CASE_FOLDED,
                 "digits_only": self._pb2.NORMALIZATION_DIGITS_ONLY}
        return self._pb2.BlindIndexSpec(normalization=names[normalization], bits=bits)

    def blind_index(self, context: Context, value: bytes, normalization: str,
                    bits: int) -> bytes:
        """The blind index of `value` under the primary key version, to store next to its
        (randomly encrypted) ciphertext."""
        request = self._pb2.BlindIndexRequest(context=self._context(context), value=value,
                                              spec=self._spec(normalization, bits))
        return bytes(self._call(self._field.BlindIndex, request).term.value)

    def search_terms_blind_index(self, context: Context, value: bytes, normalization: str,
                                 bits: int) -> list[bytes]:
        """The blind indexes of `value` under every live key version, primary first."""
        request = self._pb2.SearchTermsRequest(
            context=self._context(context), value=value,
            blind_index=self._spec(normalization, bits))
        return [bytes(t.value) for t in self._call(self._field.SearchTerms, request).terms]

    def _stream(self, method: Any, request_type: Any, context: Context,
                chunks: Iterable[bytes], end: bool) -> Iterator[bytes]:
        def requests() -> Iterator[Any]:
            yield request_type(context=self._context(context))
            sent = 0
            for chunk in chunks:
                sent += len(chunk)
                yield request_type(chunk=chunk)
            # Only once `chunks` is exhausted: if it raised instead, the daemon gets no `end`
            # and refuses to seal what it has as complete.
            if end:
                yield request_type(end=self._pb2.StreamEnd(plaintext_bytes=sent))
        # No overall deadline: the daemon limits the time between messages.
        answers = method(requests(), metadata=self._metadata)
        try:
            for answer in answers:
                yield bytes(answer.chunk)
        except grpc.RpcError as error:
            raise PhisealError.from_rpc_error(error) from None
        finally:
            # A caller that stops iterating early ends the call now (the daemon records the
            # stream as cancelled), not whenever the garbage collector gets to it.
            answers.cancel()

    def encrypt_stream(self, context: Context, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Encrypts a large value given as chunks of any size; yields the ciphertext in pieces.
        The ciphertext is complete when the iterator ends without raising."""
        return self._stream(self._field.EncryptStream, self._pb2.EncryptStreamRequest,
                            context, chunks, end=True)

    def decrypt_stream(self, context: Context, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Decrypts a stream; yields plaintext of authenticated segments. The plaintext is
        complete and authentic ONLY if the iterator ends without raising: keep it provisional
        until then (a truncated or altered stream raises after the segments before it)."""
        return self._stream(self._field.DecryptStream, self._pb2.DecryptStreamRequest,
                            context, chunks, end=False)
