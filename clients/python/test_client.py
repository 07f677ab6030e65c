"""Drives complete transactions through a running concord daemon with the Python client.

Run by `cli/tests/python_client.rs`, which starts the daemon (plain text on loopback, with a
files resource `uploads`, a mail queue `mail`, a kv store `index` and a PostgreSQL resource
`orders` on a throwaway cluster), runs this script, and then checks from Rust that the stores
hold exactly what this script committed. It can also be run by hand against any daemon with
those resources:

    CONCORD_URL=http://127.0.0.1:7700 CONCORD_TOKEN=… CONCORD_PG_DSN="host=127.0.0.1 dbname=shop" \\
        CONCORD_RESULT=/tmp/result.json python clients/python/test_client.py

Environment: ``CONCORD_URL`` (the daemon), ``CONCORD_TOKEN`` (a client's token),
``CONCORD_PG_DSN`` (a libpq connection string of
the `orders` resource's database, whose `orders(id, note)` table is replicated), and
``CONCORD_RESULT`` (where to write, as JSON, what committed: the Rust side checks it). Each
step prints a line; the last line is `N passed, 0 failed`; any failure exits non-zero.
"""

import io
import json
import os
import sys
import tempfile
import time
import traceback

import grpc
import psycopg

import concord_client as cc

#: The size of the streamed put (bytes).
PUT_BYTES = 3 << 20
#: How long to wait for the daemon to finish a branch by gid (seconds).
PHASE2_S_MAX = 10.0
#: An xid no daemon began.
UNKNOWN_XID = "n1e1s999999"
#: The message enqueued by the committed transaction.
MESSAGE = (
    b"Date: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
    b"Message-ID: <python-1@example.org>\r\n"
    b"From: shop@example.org\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: order 1 from Python\r\n"
    b"\r\n"
    b"Thanks for your order.\r\n"
)


def content() -> bytes:
    """The put's content: the same pattern the Rust side expects."""
    return bytes((i * 7) % 251 for i in range(PUT_BYTES))


class Run:
    """The state the steps share."""

    def __init__(self):
        self.url = os.environ["CONCORD_URL"]
        self.client = cc.connect(self.url, token=os.environ["CONCORD_TOKEN"],
                                 client_name="test_client")
        self.dsn = os.environ["CONCORD_PG_DSN"]
        self.result = {}

    def pg(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn)

    def prepared_gids(self) -> list:
        with self.pg() as conn:
            rows = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
        return [r[0] for r in rows]

    def order_note(self, order_id: int):
        with self.pg() as conn:
            row = conn.execute("SELECT note FROM orders WHERE id = %s", (order_id,)).fetchone()
        return None if row is None else row[0]

    def wait_unprepared(self, gid: str) -> None:
        """Waits until the daemon finished the branch `gid` (phase 2 runs after the answer)."""
        deadline = time.monotonic() + PHASE2_S_MAX
        while gid in self.prepared_gids():
            assert time.monotonic() < deadline, f"{gid} still prepared after {PHASE2_S_MAX} s"
            time.sleep(0.05)


def commit_over_every_store(run: Run) -> None:
    """files (a streamed 3 MiB put from a file), mail, kv and PostgreSQL: committed."""
    tx = run.client.begin()
    data = content()
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        assert tx.files_put("uploads", "py/big.bin", f, size_bytes=PUT_BYTES) == PUT_BYTES
    assert tx.files_read("uploads", "py/big.bin") == data, "the branch reads its own put"
    assert tx.files_read("uploads", "py/absent.bin") is None
    name, size = tx.mail_enqueue("mail", io.BytesIO(MESSAGE))
    assert name and size == len(MESSAGE), (name, size)
    tx.kv_insert("index", b"py/order/1", b"py/big.bin")
    tx.kv_insert("index", b"py/order/2", b"removed again")
    tx.kv_remove("index", b"py/order/2")
    assert tx.kv_get("index", b"py/order/1") == b"py/big.bin"
    assert tx.kv_get("index", b"py/order/2") is None

    with run.pg() as conn:
        conn.execute("INSERT INTO orders (id, note) VALUES (%s, %s)", (1, "committed from Python"))
        gid = tx.prepare_postgres(conn, "orders")
    assert gid == f"concord:{tx.xid}:orders", gid
    assert gid in run.prepared_gids(), "prepared on the application's connection"
    assert run.order_note(1) is None, "not visible before the commit"
    assert tx.outcome().state == "open"

    outcome = tx.commit()
    assert outcome.committed, outcome
    assert tx.outcome().committed
    run.wait_unprepared(gid)
    assert run.order_note(1) == "committed from Python"
    run.result.update(committed_xid=tx.xid, mail_name=name, committed_gid=gid)
    run.committed = (tx, outcome)


def a_second_commit_answers_the_same(run: Run) -> None:
    """Commit again: the same outcome; work after commit: TXN_FINISHED."""
    tx, first = run.committed
    assert tx.commit() == first
    try:
        tx.kv_insert("index", b"py/late", b"x")
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
        assert e.error_code == "ERROR_CODE_TXN_FINISHED", e
    else:
        raise AssertionError("work after commit was taken")
    try:
        tx.rollback()
    except cc.ConcordError as e:
        assert e.error_code == "ERROR_CODE_ALREADY_COMMITTED", e
    else:
        raise AssertionError("a committed transaction rolled back")


def a_rollback(run: Run) -> None:
    """files, kv and a prepared PostgreSQL branch: rolled back, and nothing of it shows."""
    tx = run.client.begin()
    tx.files_put("uploads", "py/never.bin", b"never")
    tx.kv_insert("index", b"py/never", b"x")
    with run.pg() as conn:
        conn.execute("INSERT INTO orders (id, note) VALUES (%s, %s)", (2, "rolled back"))
        gid = tx.prepare_postgres(conn, "orders")
    assert gid in run.prepared_gids()
    outcome = tx.rollback("the test says so")
    assert outcome.state == "rolled_back", outcome
    run.wait_unprepared(gid)
    assert run.order_note(2) is None
    try:
        tx.commit()
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
        assert e.error_code == "ERROR_CODE_ALREADY_ROLLED_BACK", e
        assert e.detail.xid == tx.xid
        assert e.detail.rollback.kind == cc.pb2.ROLLBACK_KIND_REQUESTED, e.detail
    else:
        raise AssertionError("a rolled-back transaction committed")
    assert tx.outcome().state == "rolled_back"
    run.result["rolled_back_xid"] = tx.xid


def a_read_only_postgres_branch_is_not_enlisted(run: Run) -> None:
    """A branch that only read: nothing to prepare; the transaction still commits."""
    tx = run.client.begin()
    with run.pg() as conn:
        conn.execute("SELECT count(*) FROM orders").fetchone()
        assert tx.prepare_postgres(conn, "orders") is None
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        try:
            tx.prepare_postgres(conn, "orders")
        except ValueError as e:
            assert "autocommit" in str(e), e
        else:
            raise AssertionError("a connection in autocommit was prepared")
    tx.kv_insert("index", b"py/read-only", b"y")
    assert tx.commit().committed


def a_lone_postgres_branch_takes_two_phases(run: Run) -> None:
    """Its only branch prepared by Python: committed with a decision record (two phases)."""
    tx = run.client.begin()
    with run.pg() as conn:
        conn.execute("INSERT INTO orders (id, note) VALUES (%s, %s)", (3, "alone"))
        gid = tx.prepare_postgres(conn, "orders")
    outcome = tx.commit()
    assert outcome.committed and outcome.decision_lsn is not None, outcome
    run.wait_unprepared(gid)
    assert run.order_note(3) == "alone"


def an_unknown_xid(run: Run) -> None:
    """NOT_FOUND with UNKNOWN_XID naming it; Outcome answers unknown."""
    try:
        run.client.commit(UNKNOWN_XID)
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.NOT_FOUND, e
        assert e.error_code == "ERROR_CODE_UNKNOWN_XID", e
        assert e.detail.xid == UNKNOWN_XID, e.detail
        assert UNKNOWN_XID in e.message
    else:
        raise AssertionError("an unknown xid committed")
    assert run.client.outcome(UNKNOWN_XID).state == "unknown"
    try:
        run.client.commit("not-an-xid")
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
        assert e.detail.field == "CommitRequest.xid", e.detail
    else:
        raise AssertionError("a malformed xid was taken")


def credentials_are_checked(run: Run) -> None:
    """No token, or a wrong one: UNAUTHENTICATED before any work."""
    for token in (None, "not-the-token"):
        with cc.connect(run.url, token=token) as client:
            try:
                client.begin()
            except cc.ConcordError as e:
                assert e.code == grpc.StatusCode.UNAUTHENTICATED, e
                assert e.error_code == "ERROR_CODE_UNAUTHENTICATED", e
            else:
                raise AssertionError(f"began with token {token!r}")


def no_daemon_there(run: Run) -> None:
    """Connecting where nothing listens: UNAVAILABLE, saying what to check."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        cc.connect(f"http://127.0.0.1:{port}", connect_timeout_s=1.0)
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.UNAVAILABLE, e
        assert "concord coordinator" in e.message, e
    else:
        raise AssertionError("connected to nothing")
    try:
        cc.connect("ftp://127.0.0.1:1")
    except ValueError as e:
        assert "http://HOST:PORT" in str(e), e
    else:
        raise AssertionError("an ftp URL was taken")


STEPS = [
    commit_over_every_store,
    a_second_commit_answers_the_same,
    a_rollback,
    a_read_only_postgres_branch_is_not_enlisted,
    a_lone_postgres_branch_takes_two_phases,
    an_unknown_xid,
    credentials_are_checked,
    no_daemon_there,
]


def main() -> int:
    run = Run()
    passed = failed = 0
    for step in STEPS:
        try:
            step(run)
            passed += 1
            print(f"ok: {step.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED: {step.__name__}", flush=True)
            traceback.print_exc()
            break  # later steps build on earlier ones
    with open(os.environ["CONCORD_RESULT"], "w") as f:
        json.dump(run.result, f)
    run.client.close()
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
