"""TVM RPC sessions for ``edge-sparse bench --rpc/--tracker``, with timeouts and one-line errors.

On the device, bound to 127.0.0.1 (never leave out ``--host``)::

    TVM_BIND_THREADS=0 python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090
    # through a tracker on the host:
    python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190
    python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090 --tracker 127.0.0.1:9190 --key rpi5

For a board on the network keep 127.0.0.1 and forward the ports over SSH (``ssh -L 9090:127.0.0.1:9090
-R 9190:127.0.0.1:9190 pi@board``): a TVM RPC server runs whatever code a client sends, without authentication, so
it must never listen on a network interface (without ``--host`` it listens on all of them).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from edge_sparse.errors import UserError
from edge_sparse.util import parse_host_port

__all__ = ["connect", "check_tracker", "probe", "describe_error"]

DEFAULT_SERVER_PORT = 9090
DEFAULT_TRACKER_PORT = 9190


def probe(host: str, port: int, timeout: float, what: str) -> None:
    """Fail fast with one line when nothing listens at host:port (TVM itself retries for a minute)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as e:
        raise UserError(f"{what} {host}:{port}: unknown host ({e.strerror})") from None
    except socket.timeout:
        raise UserError(f"{what} {host}:{port}: no answer within {timeout:g} s (host down, firewalled or wrong address)") from None
    except (ConnectionResetError, BrokenPipeError):   # something listens and hung up at once: the handshake decides
        return
    except OSError as e:
        raise UserError(f"{what} {host}:{port} is unreachable: {e.strerror or e}; is the server running "
                        f"('python -m tvm.exec.{'rpc_tracker' if 'tracker' in what else 'rpc_server'} --host {host} --port {port}')?") from None


# How a peer that is not a TVM RPC server shows up during the handshake: which one depends only on timing (whether
# it closed the socket before or after TVM sent its magic), so all of them get the same message.
_NOT_RPC = ("is not TVM RPC server", "Broken pipe", "Connection reset", "SendAll", "RecvAll", "Connection closed",
            "connection closed", "EOF")


def describe_error(e: BaseException, where: str, handshake: bool = False) -> str:
    """One line for an exception raised by TVM's RPC layer (``handshake``: raised while connecting)."""
    text = str(e)
    if "version mismatch" in text.lower():
        import tvm

        return (f"{where}: the RPC server speaks another TVM RPC protocol version; install the same TVM on the device "
                f"(apache-tvm=={tvm.__version__}, apache-tvm-ffi matching) and restart the server")
    if "is not TVM RPC server" in text or handshake and any(s in text for s in _NOT_RPC):
        return f"{where}: the program listening there is not a TVM RPC server (or it closed the connection)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("File ", "^"))]
    return f"{where}: {lines[-1] if lines else type(e).__name__}"


def _with_timeout(fn: Callable[[], Any], timeout: float, message: str) -> Any:
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="rpc-connect")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UserError(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tracker_keys(summary: dict) -> set[str]:
    keys = set(summary.get("queue_info", {}))
    for server in summary.get("server_info", []):
        keys.add(str(server.get("key", "")).split(":")[-1])
    return keys - {""}


def connect(rpc: str | None = None, *, tracker: str | None = None, key: str | None = None,
            timeout: float = 10.0, session_timeout: float = 0) -> tuple[Any, str]:
    """An RPC session to a server (``rpc='HOST:PORT'``) or through a tracker (``tracker='HOST:PORT'``, ``key``).

    Returns (session, description). Unreachable hosts, timeouts, unknown keys and protocol mismatches raise
    :class:`UserError` with one line."""
    if (rpc is None) == (tracker is None):
        raise UserError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    from tvm import rpc as tvm_rpc

    if rpc is not None:
        if key:
            raise UserError("--key is for --tracker; a direct --rpc server needs no key")
        host, port = parse_host_port(rpc, DEFAULT_SERVER_PORT, "--rpc")
        probe(host, port, timeout, "RPC server")
        where = f"RPC server {host}:{port}"
        try:
            sess = _with_timeout(lambda: tvm_rpc.connect(host, port, session_timeout=session_timeout), timeout,
                                 f"{where}: no RPC handshake within {timeout:g} s (busy with another session?)")
        except UserError:
            raise
        except Exception as e:
            raise UserError(describe_error(e, where, handshake=True)) from None
        return sess, f"rpc {host}:{port}"

    client, host, port = check_tracker(tracker, key, timeout)
    where = f"RPC tracker {host}:{port}"
    try:
        sess = _with_timeout(lambda: client.request(key, session_timeout=session_timeout, max_retry=1), timeout,
                             f"{where}: no free '{key}' server within {timeout:g} s (all busy?)")
    except UserError:
        raise
    except Exception as e:
        raise UserError(describe_error(e, f"{where} key '{key}'")) from None
    return sess, f"tracker {host}:{port} key {key}"


def check_tracker(tracker: str, key: str | None, timeout: float = 10.0) -> tuple[Any, str, int]:
    """(tracker client, host, port) once the tracker answers and a server has registered ``key``; else one
    UserError line (unreachable, not a tracker, key unknown)."""
    from tvm import rpc as tvm_rpc

    if not key:
        raise UserError("--tracker needs --key KEY (the key the RPC server registered with)")
    host, port = parse_host_port(tracker, DEFAULT_TRACKER_PORT, "--tracker")
    probe(host, port, timeout, "RPC tracker")
    where = f"RPC tracker {host}:{port}"
    try:
        client = _with_timeout(lambda: tvm_rpc.connect_tracker(host, port), timeout,
                               f"{where}: no tracker handshake within {timeout:g} s")
        deadline = time.monotonic() + timeout
        while True:  # a server that just started may not have registered yet
            keys = _tracker_keys(client.summary())
            if key in keys or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except UserError:
        raise
    except Exception as e:
        raise UserError(describe_error(e, where, handshake=True)) from None
    if key not in keys:
        raise UserError(f"{where} has no server with key '{key}' (registered: {', '.join(sorted(keys)) or 'none'}); start one with "
                        f"'python -m tvm.exec.rpc_server --host 127.0.0.1 --tracker {host}:{port} --key {key}'")
    return client, host, port
