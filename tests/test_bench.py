"""Issue 8: bench locally and through a real TVM RPC server and tracker on 127.0.0.1; onnxruntime side by side;
statistics, JSON, table, plot and one-line errors."""
from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_sparse import benchmark as B
from edge_sparse.errors import UserError
from edge_sparse.util import latency_stats

from conftest import invoke, ort_run
from conftest import start_process_group as _start
from conftest import stop_process_group as _stop

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def mlp_art(synthetic_models, tmp_path_factory):
    from edge_sparse import compiler

    out = tmp_path_factory.mktemp("bench") / "mlp"
    compiler.compile(synthetic_models["mlp"], "host", out, sparse="off", quiet=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {HOST}:{port}")




@pytest.fixture(scope="module")
def rpc_server():
    port = _free_port()
    proc = _start(["tvm.exec.rpc_server", "--host", HOST, "--port", str(port), "--port-end", str(port + 1)])
    try:
        _wait_listening(port, proc)
        yield f"{HOST}:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def tracker_with_server():
    tport, sport = _free_port(), _free_port()
    tracker = _start(["tvm.exec.rpc_tracker", "--host", HOST, "--port", str(tport), "--port-end", str(tport + 1)])
    server = None
    try:
        _wait_listening(tport, tracker)
        server = _start(["tvm.exec.rpc_server", "--host", HOST, "--port", str(sport), "--port-end", str(sport + 1),
                         "--tracker", f"{HOST}:{tport}", "--key", "test-board"])
        _wait_listening(sport, server)
        _wait_registered(tport, "test-board")
        yield f"{HOST}:{tport}"
    finally:
        if server is not None:
            _stop(server)
        _stop(tracker)


def _wait_registered(tport: int, key: str, timeout: float = 60.0) -> None:
    """A server listens before it has registered its key with the tracker: wait for the tracker to list it."""
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            queue = rpc.connect_tracker(HOST, tport).summary().get("queue_info", {})
            if queue.get(key, {}).get("free", 0) >= 1:
                return
        except Exception:  # the tracker is still starting
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no RPC server registered key {key!r} with the tracker within {timeout:.0f} s")
        time.sleep(0.2)


def _check_stats(lat: dict, count: int | None = None) -> None:
    if count is not None:
        assert lat["count"] == count
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["min_ms"] <= lat["mean_ms"] <= lat["max_ms"]
    assert lat["throughput_ips"] == pytest.approx(1e3 / lat["mean_ms"])


# ---------------------------------------------------------------------------------------------- statistics
def test_latency_stats_match_numpy():
    rng = np.random.default_rng(1)
    s = rng.gamma(4.0, 0.001, size=999)
    got = latency_stats(s)
    ms = s * 1e3
    assert got["count"] == 999
    for key, ref in [("mean_ms", ms.mean()), ("median_ms", np.median(ms)), ("min_ms", ms.min()),
                     ("max_ms", ms.max()), ("std_ms", ms.std()), ("p90_ms", np.percentile(ms, 90)),
                     ("p99_ms", np.percentile(ms, 99))]:
        assert got[key] == pytest.approx(ref, rel=1e-12)


def test_package_exports_bench_callable(mlp_art):
    import edge_sparse
    import edge_sparse.benchmark  # importing the module must not shadow the package's bench() function

    r = edge_sparse.bench(mlp_art, warmup=0, repeat=3, energy="none", quiet=True)
    assert r["schema"] == B.SCHEMA and r["runs"][0]["latency"]["count"] == 3


# ---------------------------------------------------------------------------------------------- local
def test_local_bench_with_onnxruntime_baseline(mlp_art, synthetic_models):
    r = B.bench(mlp_art, warmup=2, repeat=30, threads=1, compare=synthetic_models["mlp"], energy="estimate",
                profile=True, quiet=True)
    assert r["schema"] == B.SCHEMA
    tvm_run, ort_run_ = r["runs"]
    assert tvm_run["runtime"] == "tvm" and ort_run_["runtime"] == "onnxruntime"
    assert tvm_run["threads"] == ort_run_["threads"] == 1
    for run in r["runs"]:
        _check_stats(run["latency"], 30)
        assert run["load_ms"] > 0 and run["first_inference_ms"] > 0 and run["warmup"]["count"] == 2
        assert run["peak_memory_mb"] >= run["rss_before_load_mb"] > 0
        assert len(run["samples_ms"]) == 30
        assert run["energy"]["estimate"] is True and "ESTIMATE" in " ".join(run["energy"]["notes"])
    comp = r["comparisons"][0]
    # the same inputs went to both runtimes: outputs agree to float32 rounding
    assert comp["max_abs_diff"]["y"] < 1e-4
    assert comp["speedup_median"] == pytest.approx(ort_run_["latency"]["median_ms"] / tvm_run["latency"]["median_ms"])
    names = [op["name"] for op in tvm_run["profile"]["ops"]]
    assert any("matmul" in n for n in names)
    table = B.format_table(r)
    assert "p99" in table and "ESTIMATE" in table and "onnxruntime" in table and "top operators" in table


def test_min_seconds_bounds_the_window(mlp_art):
    t0 = time.perf_counter()
    r = B.bench(mlp_art, warmup=1, min_seconds=0.3, energy="none", quiet=True)
    assert time.perf_counter() - t0 >= 0.3
    lat = r["runs"][0]["latency"]
    assert lat["count"] >= 1 and lat["count"] * lat["min_ms"] <= 1e3 * (time.perf_counter() - t0)
    assert r["runs"][0]["energy"] is None


def test_energy_from_csv_log(mlp_art, tmp_path):
    """An external meter logging 3.0 W at 25 Hz while bench runs: the window integrates to 3 W x seconds."""
    log = tmp_path / "usb.csv"
    log.write_text("timestamp,power_w\n")
    stop = threading.Event()

    def logger():
        with open(log, "a") as f:
            while not stop.is_set():
                f.write(f"{time.time():.4f},3.0\n")
                f.flush()
                time.sleep(0.04)

    th = threading.Thread(target=logger, daemon=True)
    th.start()
    time.sleep(0.2)
    try:
        r = B.bench(mlp_art, warmup=1, repeat=5, energy=f"csv:{log}", idle_seconds=0.5, quiet=True)
    finally:
        stop.set()
        th.join()
    e = r["runs"][0]["energy"]
    assert e["source"] == "csv" and e["estimate"] is False
    assert e["idle_watts"] == pytest.approx(3.0, rel=1e-6)
    assert e["window_seconds"] >= B.ENERGY_MIN_SECONDS          # lengthened for the meter
    assert e["window_joules"] == pytest.approx(3.0 * e["window_seconds"], rel=1e-6)
    assert abs(e["joules_per_inference"]) < 1e-9 * 3.0 * e["window_seconds"] + 1e-12
    assert e["inferences"] >= r["runs"][0]["latency"]["count"]


# ---------------------------------------------------------------------------------------------- RPC
def test_rpc_bench_and_outputs(mlp_art, synthetic_models, rpc_server):
    from edge_sparse.rpc import connect

    r = B.bench(mlp_art, rpc=rpc_server, warmup=2, repeat=20, threads=1, energy="none", quiet=True)
    run = r["runs"][0]
    assert run["where"] == f"rpc {rpc_server}" and r["device"]["where"] == run["where"]
    _check_stats(run["latency"], 20)
    assert run["peak_memory_mb"] is None
    # the remote VM's outputs equal onnxruntime's on the same inputs
    import tvm
    from edge_sparse.artifact import read_manifest
    from edge_sparse.runtime import Model

    manifest = read_manifest(mlp_art)
    sess, _ = connect(rpc_server)
    runner, load_s = B._load_remote(sess, Path(mlp_art), manifest, 1)
    assert load_s > 0
    inputs = Model(mlp_art, manifest, None, None, None).make_inputs("random", 3)
    runner.set_inputs([tvm.runtime.tensor(a, runner.dev) for a in inputs.values()])
    runner.first()
    got = runner.outputs()[0]
    runner = sess = None
    gc.collect()   # the server takes one session at a time: release it for the next test
    np.testing.assert_allclose(got, ort_run(synthetic_models["mlp"], inputs)[0], rtol=1e-4, atol=1e-4)


def test_android_meter_reads_through_rpc_session(rpc_server, tmp_path):
    from edge_sparse import energy as E
    from edge_sparse.rpc import connect

    bat = tmp_path / "battery"
    bat.mkdir()
    (bat / "current_now").write_text("-250000\n")
    (bat / "voltage_now").write_text("4000000\n")
    (bat / "status").write_text("Discharging\n")
    sess, _ = connect(rpc_server)
    meter = E.AndroidBatteryMeter(root=str(bat), remote=sess)
    assert meter.interleaved and meter.via == "rpc"
    watts = meter.read()
    with pytest.raises(UserError, match="reads this machine"):
        E.open_meter("rapl", remote=sess)
    meter = sess = None
    gc.collect()
    assert watts == pytest.approx(1.0)


def test_rpc_bench_with_battery_meter(mlp_art, rpc_server, tmp_path, monkeypatch):
    """--energy android over RPC: the battery files are read through the benchmark's own session between chunks."""
    bat = tmp_path / "battery"
    bat.mkdir()
    (bat / "current_now").write_text("-500000\n")     # 0.5 A at 4.0 V: 2 W, constant
    (bat / "voltage_now").write_text("4000000\n")
    (bat / "status").write_text("Discharging\n")
    monkeypatch.setenv("EDGE_SPARSE_BATTERY", str(bat))
    r = B.bench(mlp_art, rpc=rpc_server, warmup=1, repeat=20, threads=1, energy="android", idle_seconds=0.5,
                quiet=True)
    e = r["runs"][0]["energy"]
    assert e["source"] == "android" and e["estimate"] is False and "battery" in e["boundary"]
    assert e["sample_hz"] >= 10
    assert e["idle_watts"] == pytest.approx(2.0)
    assert e["window_joules"] == pytest.approx(2.0 * e["window_seconds"], rel=1e-6)
    assert e["joules_per_inference_gross"] == pytest.approx(e["window_joules"] / e["inferences"])


def test_tracker_bench(mlp_art, tracker_with_server):
    r = B.bench(mlp_art, tracker=tracker_with_server, key="test-board", warmup=1, repeat=10, threads=1,
                energy="estimate", quiet=True)
    run = r["runs"][0]
    assert run["where"] == f"tracker {tracker_with_server} key test-board"
    _check_stats(run["latency"], 10)
    assert run["energy"]["estimate"] is True


def test_tracker_unknown_key_is_one_line(mlp_art, tracker_with_server):
    with pytest.raises(UserError, match=r"no server with key 'nope' \(registered: test-board\)") as e:
        B.bench(mlp_art, tracker=tracker_with_server, key="nope", rpc_timeout=2, quiet=True)
    assert "\n" not in str(e.value)


def test_unreachable_server_is_one_line(mlp_art):
    port = _free_port()   # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"127\.0\.0\.1:\d+ is unreachable") as e:
        B.bench(mlp_art, rpc=f"{HOST}:{port}", quiet=True)
    assert time.monotonic() - t0 < 10 and "\n" not in str(e.value)


def test_silent_server_times_out(mlp_art):
    """Something accepts the TCP connection but never answers the RPC handshake."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        with pytest.raises(UserError) as e:
            B.bench(mlp_art, rpc=f"{HOST}:{port}", rpc_timeout=1.5, quiet=True)
    finally:
        srv.close()
    assert "\n" not in str(e.value) and f"{port}" in str(e.value)


def test_version_mismatch_message():
    from edge_sparse.rpc import describe_error

    msg = describe_error(RuntimeError("InternalError: Check failed: ... Client protocol version mismatch with the "
                                      "server 0.0.0 vs 0.1.0"), "RPC server 127.0.0.1:9090")
    assert "another TVM RPC protocol version" in msg and "apache-tvm==" in msg and "\n" not in msg


def test_bad_options(mlp_art, synthetic_models, rpc_server):
    with pytest.raises(UserError, match="--compare runs onnxruntime on this machine"):
        B.bench(mlp_art, rpc=rpc_server, compare=synthetic_models["mlp"], quiet=True)
    with pytest.raises(UserError, match="--tracker needs --key"):
        B.bench(mlp_art, tracker="127.0.0.1:9190", quiet=True)
    with pytest.raises(UserError, match="port 'x' is not a number"):
        B.bench(mlp_art, rpc="127.0.0.1:x", quiet=True)
    with pytest.raises(UserError, match=r"--repeat must be in \[1, "):
        B.bench(mlp_art, repeat=0, quiet=True)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_bench_json_plot(mlp_art, synthetic_models, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["bench", mlp_art, mlp_art, "--repeat", 8, "--warmup", 1, "--threads", 1, "--energy", "estimate",
            "--compare", synthetic_models["mlp"], "--json", out, "--plot", png, "-q"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert "median" in res.output and "ESTIMATE" in res.output
    data = json.loads(out.read_text())
    assert data["schema"] == B.SCHEMA and [r["runtime"] for r in data["runs"]] == ["tvm", "tvm", "onnxruntime"]
    assert len(data["comparisons"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = invoke(args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_bench_errors(mlp_art, tmp_path):
    res = invoke(["bench", tmp_path / "missing"])
    assert res.exit_code == 2 and "error:" in res.output
    res = invoke(["bench", mlp_art, "--energy", "nonsense"])
    assert res.exit_code == 2 and "unknown --energy 'nonsense'" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_bench_with_input_file(mlp_art, synthetic_models, tmp_path):
    import numpy as np

    from edge_sparse.artifact import read_manifest

    spec = read_manifest(mlp_art)["inputs"][0]
    x = np.random.default_rng(5).standard_normal(spec["shape"]).astype(np.float32)
    np.savez(tmp_path / "x.npz", **{spec["name"]: x})
    out = tmp_path / "r.json"
    res = invoke(["bench", mlp_art, "--input", tmp_path / "x.npz", "--repeat", 5, "--warmup", 1, "--threads", 1,
                  "--energy", "none", "--compare", synthetic_models["mlp"], "--json", out, "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    diffs = data["comparisons"][0]["max_abs_diff"]
    assert diffs and all(d is not None and d < 1e-4 for d in diffs.values()), diffs
    np.save(tmp_path / "bad.npy", x[..., :-1])          # the given file is what runs: a wrong shape is refused
    res = invoke(["bench", mlp_art, "--input", tmp_path / "bad.npy", "--repeat", 2, "--energy", "none"])
    assert res.exit_code == 2 and "has shape" in res.output and len(res.output.strip().splitlines()) == 1
