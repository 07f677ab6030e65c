"""The Python client over mutual TLS with a bearer token, against a running daemon.

Run by `cli/tests/python_client.rs` against a daemon serving TLS with the certificate of a CA
it made, asking clients for a certificate of the same CA and a token. Environment:
``CONCORD_URL`` (``https://127.0.0.1:PORT``), ``CONCORD_TOKEN``, ``CONCORD_CA`` (the CA's
PEM file), ``CONCORD_CLIENT_CERT`` and ``CONCORD_CLIENT_KEY`` (PEM files). The last line is
`N passed, 0 failed`; any failure exits non-zero.
"""

import os
import sys
import traceback

import grpc

import concord_client as cc

URL = os.environ.get("CONCORD_URL", "")
TOKEN = os.environ.get("CONCORD_TOKEN", "")
CA = os.environ.get("CONCORD_CA", "")
CERT = os.environ.get("CONCORD_CLIENT_CERT", "")
KEY = os.environ.get("CONCORD_CLIENT_KEY", "")


def a_transaction_over_mutual_tls() -> None:
    """CA, client certificate and token: a kv transaction commits."""
    with cc.connect(URL, token=TOKEN, ca=CA, client_cert=CERT, client_key=KEY) as client:
        tx = client.begin()
        tx.kv_insert("index", b"py/tls", b"over TLS")
        assert tx.kv_get("index", b"py/tls") == b"over TLS"
        assert tx.commit().committed


def without_a_client_certificate_nothing_is_served() -> None:
    """The daemon asks for a client certificate: without one, no call gets through."""
    try:
        with cc.connect(URL, token=TOKEN, ca=CA, connect_timeout_s=2.0) as client:
            client.begin()
    except cc.ConcordError as e:
        assert e.code == grpc.StatusCode.UNAVAILABLE, e
    else:
        raise AssertionError("served without a client certificate")


def https_needs_a_ca_and_http_refuses_one() -> None:
    """TLS settings that do not fit the URL are refused before any connection."""
    for url, kwargs in ((URL, {}), (URL.replace("https://", "http://"), {"ca": CA})):
        try:
            cc.connect(url, token=TOKEN, **kwargs)
        except ValueError as e:
            assert "https" in str(e), e
        else:
            raise AssertionError(f"{url} with {kwargs} was taken")


STEPS = [
    a_transaction_over_mutual_tls,
    without_a_client_certificate_nothing_is_served,
    https_needs_a_ca_and_http_refuses_one,
]


def main() -> int:
    passed = failed = 0
    for step in STEPS:
        try:
            step()
            passed += 1
            print(f"ok: {step.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED: {step.__name__}", flush=True)
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
