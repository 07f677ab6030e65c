"""A Python client of the concord coordinator daemon (`concord coordinator`).

The idea: an application written in Python runs global transactions through a concord daemon
exactly as a Rust application linking `participant` in remote mode does. It begins a
transaction, sends its work on the daemon's own stores (files, mail queue, kv) over gRPC,
prepares its PostgreSQL branches on its *own* psycopg connection (as in XA) and enlists them by
gid, then asks the daemon to commit. The daemon decides, journals the decision and finishes
every branch, the PostgreSQL ones by gid from its own connection.

Everything on the wire is `proto/concord/v1/coordinator.proto`, whose comments are the
contract; this module is a thin layer over stubs that `grpcio-tools` generates from that file
(never committed: :func:`generate_stubs` writes them into a directory of the caller's choice,
and importing this module generates them into a temporary directory when
``CONCORD_PY_STUBS`` does not name one already generated).

Types:

* :func:`connect` gives a :class:`Client`: ``http://HOST:PORT`` is plain text,
  ``https://HOST:PORT`` is TLS trusting the CA given (no built-in roots, as in
  ``proto::client``); a bearer token goes in every call's metadata as
  ``authorization: Bearer <token>``.
* :meth:`Client.begin` gives a :class:`Transaction`, whose methods are the branch calls:
  :meth:`~Transaction.files_put` (streamed from a file object in chunks of
  ``Limits.chunk_bytes_max``), :meth:`~Transaction.files_delete`,
  :meth:`~Transaction.files_read`, :meth:`~Transaction.mail_enqueue` (streamed),
  :meth:`~Transaction.kv_insert`, :meth:`~Transaction.kv_remove`,
  :meth:`~Transaction.kv_get`, :meth:`~Transaction.prepare_postgres` (the psycopg helper),
  :meth:`~Transaction.enlist_prepared`, :meth:`~Transaction.commit`,
  :meth:`~Transaction.rollback`, :meth:`~Transaction.outcome`.
* :class:`Outcome` is what became of a transaction; :class:`ConcordError` is every failure,
  carrying the gRPC status code and the decoded ``ErrorDetail`` of the status's
  ``grpc-status-details-bin`` trailer.

Implementation caveats:

* Synchronous (grpcio's blocking stubs); one :class:`Client` may be shared by threads.
* A commit whose call fails in transport (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) asks
  ``Outcome`` once before answering; when that fails too the answer is an in-doubt
  :class:`Outcome`, never an error (the transaction must not be run again).
* A PostgreSQL branch that wrote nothing is rolled back on the application's connection and not
  enlisted (``prepare_branch`` refuses it with SQLSTATE ``CF002``); a remote PostgreSQL branch
  always takes two phases, even when it is the transaction's only branch.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from typing import BinaryIO, Iterator, Optional, Union

import grpc

#: The directory of this file; the schema is at ``../../proto`` from here in the repository.
HERE = os.path.dirname(os.path.abspath(__file__))
#: Where ``concord/v1/coordinator.proto`` lives in a checkout.
PROTO_ROOT_DEFAULT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
#: The schema file, relative to the proto root.
PROTO_FILE = "concord/v1/coordinator.proto"
#: The schema files it imports (generated next to it, so that its module imports them).
PROTO_IMPORTS = ("concord/v1/failover.proto",)
#: A content chunk when the daemon's limit is not known yet (bytes).
CHUNK_BYTES_DEFAULT = 256 << 10
#: The deadline of one call when the caller gives none (seconds).
CALL_TIMEOUT_S_DEFAULT = 30.0
#: The largest message this client decodes (bytes): above any daemon's configured limit.
CLIENT_MESSAGE_BYTES_MAX = 64 << 20
#: The metadata key of a status's binary details.
DETAILS_KEY = "grpc-status-details-bin"
#: The text form of an xid: node, epoch, sequence.
XID_PATTERN = re.compile(r"^n(\d+)e(\d+)s(\d+)$")
#: The SQLSTATE of ``concord.prepare_branch`` for a branch that wrote nothing.
SQLSTATE_READ_ONLY = "CF002"


# ------------------------------------------------------------------------------------------
# The generated stubs


def generate_stubs(out_dir: str, proto_root: str = PROTO_ROOT_DEFAULT) -> str:
    """Generates the Python stubs of the schema into ``out_dir`` (created when missing).

    Writes ``concord/v1/coordinator_pb2.py`` and ``coordinator_pb2_grpc.py`` (and the
    modules of the files it imports) under it; put
    ``out_dir`` on ``sys.path`` (or in ``CONCORD_PY_STUBS``) to import them. Returns
    ``out_dir``. Raises ``RuntimeError`` naming the fix when ``grpcio-tools`` is missing or
    the schema does not compile.
    """
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError(
            "grpcio-tools is not installed: pip install -r clients/python/requirements.txt"
        ) from e
    proto = os.path.join(proto_root, PROTO_FILE)
    if not os.path.isfile(proto):
        raise RuntimeError(f"the schema {proto} is missing: pass the proto root of a checkout")
    os.makedirs(out_dir, exist_ok=True)
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        proto,
    ] + [os.path.join(proto_root, name) for name in PROTO_IMPORTS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}: see its messages above")
    return out_dir


def _load_stubs():
    """Imports the generated modules, generating them first when ``CONCORD_PY_STUBS`` is not
    set (into a temporary directory removed when the process exits)."""
    stubs = os.environ.get("CONCORD_PY_STUBS")
    if not stubs:
        stubs = tempfile.mkdtemp(prefix="concord-py-stubs-")
        atexit.register(shutil.rmtree, stubs, True)
        generate_stubs(stubs)
    if stubs not in sys.path:
        sys.path.insert(0, stubs)
    pb2 = importlib.import_module("concord.v1.coordinator_pb2")
    pb2_grpc = importlib.import_module("concord.v1.coordinator_pb2_grpc")
    return pb2, pb2_grpc


if __name__ == "__main__":
    # `python concord_client.py generate DIR`: writes the stubs into DIR (for CONCORD_PY_STUBS),
    # before anything imports them.
    if len(sys.argv) == 3 and sys.argv[1] == "generate":
        print(generate_stubs(sys.argv[2]))
        sys.exit(0)
    sys.exit("usage: python concord_client.py generate DIR")

pb2, pb2_grpc = _load_stubs()

#: The schema revision this client was generated from (``SchemaVersion.SCHEMA_VERSION_CURRENT``).
SCHEMA_VERSION = pb2.SCHEMA_VERSION_CURRENT


# ------------------------------------------------------------------------------------------
# Errors


class ConcordError(Exception):
    """A call the daemon (or the transport) refused.

    ``code`` is the gRPC status code (``grpc.StatusCode``), ``message`` the daemon's words,
    ``detail`` the decoded ``concord.v1.ErrorDetail`` (``None`` when the status carried none:
    a transport failure, or a proxy's). ``error_code`` is the detail's code by name
    (``"ERROR_CODE_UNKNOWN_XID"``), ``retryable`` whether trying again can succeed.
    """

    def __init__(self, code: grpc.StatusCode, message: str, detail=None):
        self.code = code
        self.message = message
        self.detail = detail
        super().__init__(f"{code.name}: {message}")

    @property
    def error_code(self) -> Optional[str]:
        """The ``ErrorDetail.code`` by name, or ``None`` without a detail."""
        if self.detail is None:
            return None
        return pb2.ErrorCode.Name(self.detail.code)

    @property
    def retryable(self) -> bool:
        """Whether the same call (RESOURCE) or the whole transaction (ROLLED_BACK) may succeed
        when tried again."""
        return bool(self.detail is not None and self.detail.retryable)

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "ConcordError":
        """The error of a failed call, its trailer's ``ErrorDetail`` decoded."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        return cls(code, message or "", _detail_of(error))


class MalformedDetail(ConcordError):
    """A status whose ``grpc-status-details-bin`` is not an ``ErrorDetail``: a server that is
    not concord's, or a newer one; ``detail`` is ``None`` and ``raw`` holds the bytes."""

    def __init__(self, code, message, raw: bytes, reason: str):
        super().__init__(code, f"{message} (its details do not decode: {reason})")
        self.raw = raw


def _raw_detail(error: grpc.RpcError) -> Optional[bytes]:
    """The bytes of a failed call's ``grpc-status-details-bin`` trailer, or ``None``."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == DETAILS_KEY:
            return value
    return None


def _detail_of(error: grpc.RpcError):
    """The ``ErrorDetail`` in a failed call's trailing metadata, or ``None``."""
    raw = _raw_detail(error)
    if raw is None:
        return None
    detail = pb2.ErrorDetail()
    detail.ParseFromString(raw)
    return detail


def _call(method, request, timeout: float, metadata):
    """Runs one unary or client-streamed call; a failure is a :class:`ConcordError`."""
    try:
        return method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise _error(e) from None


def _error(e: grpc.RpcError) -> ConcordError:
    try:
        return ConcordError.from_rpc(e)
    except Exception as decode:  # a malformed trailer is an error, never a crash
        return MalformedDetail(e.code(), e.details() or "", _raw_detail(e) or b"", str(decode))


# ------------------------------------------------------------------------------------------
# Outcomes


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of a transaction.

    ``state`` is one of ``"committed"``, ``"rolled_back"``, ``"in_doubt"``, ``"unknown"``
    (the daemon holds nothing about it), ``"open"``. For a rollback, ``cause`` is the
    ``RollbackCause`` message (``cause.reason``, ``cause.retryable``); for a commit,
    ``decision_lsn`` the LSN of its decision record (``None`` when none was needed); in doubt,
    ``error`` and ``branch`` say what is unknown.
    """

    xid: str
    state: str
    decision_lsn: Optional[int] = None
    cause: object = None
    error: str = ""
    branch: Optional[str] = None

    @property
    def committed(self) -> bool:
        """Whether the transaction committed."""
        return self.state == "committed"

    @classmethod
    def from_wire(cls, outcome) -> "Outcome":
        """The outcome of a ``concord.v1.TxnOutcome``."""
        which = outcome.WhichOneof("state")
        if which == "committed":
            lsn = outcome.committed.decision_lsn if outcome.committed.HasField("decision_lsn") else None
            return cls(outcome.xid, which, decision_lsn=lsn)
        if which == "rolled_back":
            return cls(outcome.xid, which, cause=outcome.rolled_back.cause)
        if which == "in_doubt":
            d = outcome.in_doubt
            return cls(outcome.xid, which, error=d.error, branch=d.branch if d.HasField("branch") else None)
        if which in ("unknown", "open"):
            return cls(outcome.xid, which)
        raise ConcordError(grpc.StatusCode.INTERNAL, f"a TxnOutcome without a state: {outcome}")


# ------------------------------------------------------------------------------------------
# Connecting


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
            grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (plain text or TLS alike)."""

    def __init__(self, token: str):
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or ()) + [self._pair]
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _read(path_or_pem: Union[str, bytes, None], what: str) -> Optional[bytes]:
    """PEM bytes as given, or read from a path."""
    if path_or_pem is None or isinstance(path_or_pem, bytes):
        return path_or_pem
    try:
        with open(path_or_pem, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path_or_pem}: {e.strerror}") from None


def _token(token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    if token_file is not None:
        with open(token_file, encoding="ascii") as f:
            token = f.readline().rstrip("\r\n")
        if not token:
            raise ValueError(f"token file {token_file}: empty")
    if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ValueError("the token is not usable: a token is printable ASCII without spaces")
    return token


def connect(url: str, *, token: Optional[str] = None, token_file: Optional[str] = None,
            ca: Union[str, bytes, None] = None, client_cert: Union[str, bytes, None] = None,
            client_key: Union[str, bytes, None] = None, client_name: str = "python",
            timeout_s: float = CALL_TIMEOUT_S_DEFAULT, connect_timeout_s: float = 10.0) -> "Client":
    """Connects to the daemon at ``url`` and waits (at most ``connect_timeout_s``) until the
    channel is ready.

    ``http://HOST:PORT``: plain text. ``https://HOST:PORT``: TLS trusting the CA certificate
    ``ca`` (a PEM path or bytes; required: there are no built-in roots), presenting
    ``client_cert``/``client_key`` when given. ``token`` (or the first line of ``token_file``)
    goes in every call as ``authorization: Bearer <token>``. ``timeout_s`` is every call's
    deadline unless a call gives its own.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise ValueError(
            f"daemon URL {url!r}: write http://HOST:PORT (plain text) or https://HOST:PORT (TLS)")
    target = f"{parsed.hostname}:{parsed.port}"
    if ":" in parsed.hostname:
        target = f"[{parsed.hostname}]:{parsed.port}"
    options = [
        ("grpc.max_receive_message_length", CLIENT_MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", CLIENT_MESSAGE_BYTES_MAX),
        ("grpc.keepalive_time_ms", 10_000),
    ]
    if parsed.scheme == "https":
        if ca is None:
            raise ValueError(f"daemon URL {url}: https needs the CA certificate (ca=PATH)")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "CA certificate"),
            private_key=_read(client_key, "client key"),
            certificate_chain=_read(client_cert, "client certificate"))
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        if ca is not None or client_cert is not None:
            raise ValueError(f"daemon URL {url}: TLS settings need an https:// URL")
        channel = grpc.insecure_channel(target, options=options)
    token = _token(token, token_file)
    if token is not None:
        channel = grpc.intercept_channel(channel, _Auth(token))
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise ConcordError(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot connect to the daemon at {url} within {connect_timeout_s} s; "
            "is `concord coordinator` running there?") from None
    return Client(channel, client_name=client_name, timeout_s=timeout_s)


class Client:
    """A connection to a daemon; see :func:`connect`. Closes its channel on ``close()`` or at
    the end of a ``with`` block."""

    def __init__(self, channel: grpc.Channel, *, client_name: str = "python",
                 timeout_s: float = CALL_TIMEOUT_S_DEFAULT):
        self._channel = channel
        self.stub = pb2_grpc.CoordinatorStub(channel)
        self.client_name = client_name
        self.timeout_s = timeout_s

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def header(self):
        """The ``RequestHeader`` every request carries."""
        return pb2.RequestHeader(schema_version=SCHEMA_VERSION, client_name=self.client_name)

    def call(self, name: str, request, timeout_s: Optional[float] = None):
        """Runs the unary or client-streamed call ``name`` (``"Begin"``, ``"FilesPut"``, …)."""
        return _call(getattr(self.stub, name), request, timeout_s or self.timeout_s, None)

    def begin(self, timeout_ms: Optional[int] = None) -> "Transaction":
        """Begins a transaction (``timeout_ms``: how long it may stay open, capped by the
        daemon)."""
        request = pb2.BeginRequest(header=self.header())
        if timeout_ms is not None:
            request.timeout_ms = timeout_ms
        return Transaction(self, self.call("Begin", request))

    def outcome(self, xid: str) -> Outcome:
        """What became of ``xid`` (``"unknown"`` for one the daemon holds nothing about)."""
        response = self.call("Outcome", pb2.OutcomeRequest(header=self.header(), xid=xid))
        return Outcome.from_wire(response.outcome)

    def commit(self, xid: str) -> Outcome:
        """Commits ``xid`` (see :meth:`Transaction.commit`)."""
        request = pb2.CommitRequest(header=self.header(), xid=xid)
        try:
            return Outcome.from_wire(self.call("Commit", request).outcome)
        except ConcordError as e:
            if e.detail is not None or e.code not in _CUT_OFF:
                raise
            return self._after_cut_off(xid, e)

    def rollback(self, xid: str, reason: str = "") -> Outcome:
        """Rolls ``xid`` back (see :meth:`Transaction.rollback`)."""
        request = pb2.RollbackRequest(header=self.header(), xid=xid, reason=reason)
        return Outcome.from_wire(self.call("Rollback", request).outcome)

    def _after_cut_off(self, xid: str, cut: ConcordError) -> Outcome:
        """A commit cut off in transport: its outcome, asked once, or in doubt."""
        try:
            known = self.outcome(xid)
        except ConcordError as e:
            return Outcome(xid, "in_doubt", error=f"the commit was cut off ({cut}) and Outcome failed ({e})")
        if known.state in ("committed", "in_doubt"):
            return known
        if known.state == "rolled_back":
            raise ConcordError(grpc.StatusCode.ABORTED, f"transaction {xid} rolled back: {known.cause.reason}")
        return Outcome(xid, "in_doubt", error=f"the commit was cut off ({cut}); Outcome says {known.state}")

    def health(self) -> str:
        """The daemon's serving state by name (``"SERVING_SERVING"``, …)."""
        response = self.call("Health", pb2.HealthRequest(header=self.header()))
        return pb2.Serving.Name(response.serving)

    def status(self):
        """The daemon's ``StatusResponse`` (role, epoch, durable LSN, resources)."""
        return self.call("Status", pb2.StatusRequest(header=self.header()))


#: Transport failures after which a commit's outcome is asked for, not guessed.
_CUT_OFF = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


# ------------------------------------------------------------------------------------------
# Transactions


def parse_xid(xid: str):
    """``(node, epoch, seq)`` of an xid's text form ``n<node>e<epoch>s<seq>``."""
    m = XID_PATTERN.match(xid)
    if m is None:
        raise ValueError(f"{xid!r} is not an xid (n<node>e<epoch>s<seq>)")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _roll_back_quietly(conn) -> None:
    """Ends the failed transaction on ``conn``; a broken connection is left to its owner (the
    server rolls an unprepared transaction back when the session ends)."""
    import psycopg

    try:
        conn.rollback()
    except psycopg.Error:
        pass


class Transaction:
    """One global transaction begun on a daemon.

    ``xid`` (text form), ``epoch`` (the daemon's, for PostgreSQL fence checks), ``node`` (from
    the xid), ``timeout_ms`` and ``limits`` (``concord.v1.Limits``) come from ``Begin``.
    """

    def __init__(self, client: Client, begun):
        self.client = client
        self.xid: str = begun.xid
        self.epoch: int = begun.epoch
        self.timeout_ms: int = begun.timeout_ms
        self.limits = begun.limits
        self.node, _, _ = parse_xid(self.xid)

    def __repr__(self) -> str:
        return f"Transaction({self.xid})"

    @property
    def chunk_bytes(self) -> int:
        """The chunk size of streamed calls: the daemon's ``chunk_bytes_max``."""
        return int(self.limits.chunk_bytes_max) or CHUNK_BYTES_DEFAULT

    def target(self, resource: str):
        """The ``BranchTarget`` of ``resource`` in this transaction."""
        return pb2.BranchTarget(header=self.client.header(), xid=self.xid, resource=resource)

    def _chunks(self, source: Union[bytes, BinaryIO]) -> Iterator[bytes]:
        """``source`` in chunks of at most :attr:`chunk_bytes` (read lazily from a file
        object, so memory stays bounded)."""
        size = self.chunk_bytes
        if isinstance(source, (bytes, bytearray, memoryview)):
            view = memoryview(source)
            for at in range(0, len(view), size):
                yield bytes(view[at:at + size])
            return
        while True:
            chunk = source.read(size)
            if not chunk:
                return
            yield chunk

    # Files

    def files_put(self, resource: str, path: str, source: Union[bytes, BinaryIO],
                  size_bytes: Optional[int] = None) -> int:
        """Writes ``path`` in files resource ``resource`` with the content of ``source`` (bytes,
        or a binary file object read in chunks), visible when the transaction commits.
        ``size_bytes``, when given, lets the daemon refuse an oversized put before any content
        and one whose content is not exactly that long. Returns the bytes written."""
        start = pb2.FilesPutStart(target=self.target(resource), path=path)
        if size_bytes is None and isinstance(source, (bytes, bytearray, memoryview)):
            size_bytes = len(source)
        if size_bytes is not None:
            start.size_bytes = size_bytes

        def messages():
            yield pb2.FilesPutRequest(start=start)
            for chunk in self._chunks(source):
                yield pb2.FilesPutRequest(chunk=chunk)

        return self.client.call("FilesPut", messages()).size_bytes

    def files_delete(self, resource: str, path: str) -> None:
        """Deletes ``path`` in files resource ``resource`` when the transaction commits."""
        request = pb2.FilesDeleteRequest(target=self.target(resource), path=path)
        self.client.call("FilesDelete", request)

    def files_read_into(self, resource: str, path: str, out: BinaryIO) -> Optional[int]:
        """Streams ``path`` as this transaction sees it into ``out``; returns its size, or
        ``None`` when it does not exist for this transaction."""
        request = pb2.FilesReadRequest(target=self.target(resource), path=path)
        try:
            stream = self.client.stub.FilesRead(request, timeout=self.client.timeout_s)
            first = True
            found = None
            for message in stream:
                if first:
                    first = False
                    if not message.found:
                        return None
                    found = message.size_bytes
                out.write(message.chunk)
            return found
        except grpc.RpcError as e:
            raise _error(e) from None

    def files_read(self, resource: str, path: str) -> Optional[bytes]:
        """``path`` as this transaction sees it, whole, or ``None`` when it does not exist."""
        import io

        out = io.BytesIO()
        if self.files_read_into(resource, path, out) is None:
            return None
        return out.getvalue()

    # Mail

    def mail_enqueue(self, resource: str, message: Union[bytes, BinaryIO]):
        """Enqueues the RFC 5322 ``message`` (bytes or a binary file object, streamed) in mail
        resource ``resource``; returns ``(name, size_bytes)``: it is delivered as
        ``new/<name>`` when the transaction commits."""

        def messages():
            yield pb2.MailEnqueueRequest(start=self.target(resource))
            for chunk in self._chunks(message):
                yield pb2.MailEnqueueRequest(chunk=chunk)

        response = self.client.call("MailEnqueue", messages())
        return response.name, response.size_bytes

    # Key-value

    def kv_insert(self, resource: str, key: bytes, value: bytes) -> None:
        """Inserts or replaces ``key`` in kv resource ``resource``."""
        request = pb2.KvInsertRequest(target=self.target(resource), key=key, value=value)
        self.client.call("KvInsert", request)

    def kv_remove(self, resource: str, key: bytes) -> None:
        """Removes ``key`` from kv resource ``resource``."""
        self.client.call("KvRemove", pb2.KvRemoveRequest(target=self.target(resource), key=key))

    def kv_get(self, resource: str, key: bytes) -> Optional[bytes]:
        """``key``'s value as this transaction sees it, or ``None``."""
        response = self.client.call("KvGet", pb2.KvGetRequest(target=self.target(resource), key=key))
        return response.value if response.HasField("value") else None

    # PostgreSQL

    def gid(self, resource: str) -> str:
        """The gid of this transaction's branch in PostgreSQL resource ``resource``."""
        return f"concord:{self.xid}:{resource}"

    def prepare_postgres(self, conn, resource: str) -> Optional[str]:
        """Prepares the application's own PostgreSQL work and enlists it as ``resource``'s
        branch; returns the gid, or ``None`` for a branch that wrote nothing.

        ``conn`` is a psycopg (v3) connection, not in autocommit, whose open transaction holds
        the branch's statements; it must be connected to the database of the daemon's
        resource ``resource``, with the ``concord`` schema installed (``concord pg install``).
        On it this runs ``SELECT concord.prepare_branch(epoch, gid, xid, node)`` (fence check,
        capture, marker) and ``PREPARE TRANSACTION gid``, then ``EnlistPrepared`` with the
        text ``prepare_branch`` returned as the redo. After it the connection is free for
        other work; the prepared transaction belongs to the server, and the daemon commits or
        rolls it back by gid. A branch that wrote nothing is rolled back and not enlisted.
        When the prepare fails, the transaction on ``conn`` is rolled back and the psycopg
        error raised (SQLSTATE ``CF001``: fenced at a higher epoch); roll the global
        transaction back then.
        """
        import psycopg
        from psycopg import sql

        if conn.autocommit:
            raise ValueError(
                "prepare_postgres needs the connection's open transaction: a connection in "
                "autocommit has already committed its statements; open it with autocommit=False")
        gid = self.gid(resource)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT concord.prepare_branch(%s::bigint, %s::text, %s::text, %s::integer)",
                    (self.epoch, gid, self.xid, self.node))
                row = cur.fetchone()
                redo = row[0] if row is not None else None
                if redo is None:
                    raise ConcordError(grpc.StatusCode.INTERNAL,
                                       "concord.prepare_branch returned no redo")
                cur.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
        except psycopg.Error as e:
            _roll_back_quietly(conn)
            if e.sqlstate == SQLSTATE_READ_ONLY:
                return None
            raise
        except ConcordError:
            _roll_back_quietly(conn)
            raise
        self.enlist_prepared(resource, gid, redo.encode("utf-8"))
        return gid

    def enlist_prepared(self, resource: str, gid: str, redo: bytes) -> None:
        """Enlists a PostgreSQL branch prepared under ``gid`` with its ``redo`` (the text
        ``concord.prepare_branch`` returned, UTF-8); :meth:`prepare_postgres` calls it."""
        request = pb2.EnlistPreparedRequest(target=self.target(resource), gid=gid, redo=redo)
        self.client.call("EnlistPrepared", request)

    # The end

    def commit(self) -> Outcome:
        """Commits; returns the outcome: committed, or in doubt (never run an in-doubt
        transaction again; ask :meth:`outcome` later). A commit that rolled back raises
        :class:`ConcordError` (ABORTED when running the transaction again may succeed,
        FAILED_PRECONDITION otherwise) whose ``detail.rollback`` says why. Asking again
        answers the same."""
        return self.client.commit(self.xid)

    def rollback(self, reason: str = "") -> Outcome:
        """Rolls back (``reason`` is recorded); returns the rolled-back outcome."""
        return self.client.rollback(self.xid, reason)

    def outcome(self) -> Outcome:
        """What became of this transaction so far."""
        return self.client.outcome(self.xid)

