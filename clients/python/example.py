"""One complete transaction over files, mail, kv and PostgreSQL, from Python, printed step by
step: an order is saved in PostgreSQL (on this program's own psycopg connection), its invoice
is stored as a file (streamed), a confirmation mail is queued and the order is indexed in the
kv store — all of it or nothing.

    python clients/python/example.py http://127.0.0.1:7700 "host=127.0.0.1 dbname=shop"

Arguments (or ``CONCORD_URL`` / ``CONCORD_PG_DSN``): the daemon's URL and a libpq connection
string of the database of its PostgreSQL resource. The daemon's configuration must have a files
resource ``uploads``, a mail queue ``mail``, a kv store ``index`` and a postgres resource
``orders`` (the names ``concord coordinator --data DIR`` gives the first three), and the
database the ``concord`` schema (``concord pg install --resource orders``). The example creates
its table ``example_orders`` when missing. ``CONCORD_TOKEN`` is sent as the bearer token when
set. The README's "Any language: Python" section shows the whole set-up.
"""

import io
import os
import sys

import psycopg

import concord_client as cc


def main(url: str, dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS example_orders (id bigint PRIMARY KEY, item text NOT NULL)"
        )
        order_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM example_orders").fetchone()[0]

    client = cc.connect(url, token=os.environ.get("CONCORD_TOKEN"), client_name="example.py")
    print(f"connected to {url}: {client.health()}")
    tx = client.begin()
    print(f"begun {tx.xid} (epoch {tx.epoch}, chunks of {tx.chunk_bytes} bytes)")

    invoice = f"Invoice for order {order_id}: one teapot.\n".encode() * 1000
    path = f"example/invoice-{order_id}.txt"
    written = tx.files_put("uploads", path, io.BytesIO(invoice), size_bytes=len(invoice))
    print(f"files  uploads: put {path} ({written} bytes, streamed)")

    message = (
        "Date: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
        f"Message-ID: <example-{order_id}-{tx.xid}@example.org>\r\n"
        "From: shop@example.org\r\nTo: alice@example.org\r\n"
        f"Subject: your order {order_id}\r\n\r\nThanks for ordering a teapot.\r\n"
    ).encode()
    name, size = tx.mail_enqueue("mail", message)
    print(f"mail   mail: enqueued new/{name} ({size} bytes) on commit")

    key = f"example/order/{order_id}".encode()
    tx.kv_insert("index", key, path.encode())
    print(f"kv     index: {key.decode()} -> {tx.kv_get('index', key).decode()}")

    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO example_orders (id, item) VALUES (%s, %s)", (order_id, "teapot"))
        gid = tx.prepare_postgres(conn, "orders")
    print(f"pg     orders: order {order_id} inserted, prepared as {gid} and enlisted")

    outcome = tx.commit()
    print(f"commit {tx.xid}: {outcome.state} (decision at lsn {outcome.decision_lsn})")
    if not outcome.committed:
        print("in doubt: do not run it again; ask the outcome later", file=sys.stderr)
        return 1
    print(f"outcome asked again: {tx.outcome().state}")
    client.close()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    url = args[0] if args else os.environ.get("CONCORD_URL", "http://127.0.0.1:7700")
    dsn = args[1] if len(args) > 1 else os.environ.get("CONCORD_PG_DSN")
    if not dsn:
        sys.exit("usage: example.py URL PG_DSN (or CONCORD_URL and CONCORD_PG_DSN)")
    sys.exit(main(url, dsn))
