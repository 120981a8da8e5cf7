"""Energy meters on recorded sysfs trees and captured command outputs; the idle/window protocol; the estimate."""
from __future__ import annotations

import stat
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_sparse import energy as E
from edge_sparse.errors import UserError

# The layout of `vcgencmd pmic_read_adc` on a Raspberry Pi 5: right-aligned names, channel indices out of order,
# currents first, then voltages; EXT5V_V and BATT_V have no current. Values are typical of an idle board.
PMIC_OUTPUT = """\
 3V7_WL_SW_A current(0)=0.00390372A
   3V3_SYS_A current(1)=0.05563080A
   1V8_SYS_A current(2)=0.17177160A
  DDR_VDD2_A current(3)=0.01951860A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.14639400A
    0V8_SW_A current(6)=0.31226730A
  VDD_CORE_A current(7)=0.73200000A
   3V3_DAC_A current(17)=0.00018315A
   0V8_AON_A current(16)=0.00293040A
      HDMI_A current(22)=0.02085180A
 3V7_WL_SW_V volt(8)=3.74340500V
   3V3_SYS_V volt(9)=3.30843600V
   1V8_SYS_V volt(10)=1.79891400V
  DDR_VDD2_V volt(11)=1.11355800V
  DDR_VDDQ_V volt(12)=0.60545940V
   1V1_SYS_V volt(13)=1.10989200V
    0V8_SW_V volt(14)=0.80024640V
  VDD_CORE_V volt(15)=0.72121100V
   3V3_DAC_V volt(20)=3.30476900V
   0V8_AON_V volt(19)=0.80036850V
      HDMI_V volt(23)=5.14500000V
     EXT5V_V volt(24)=5.14500000V
      BATT_V volt(25)=0.00000000V
"""


def _write(path: Path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


# ---------------------------------------------------------------------------------------------- RAPL
def _rapl_tree(root: Path, energy_uj: int, max_uj: int = 262143328850) -> Path:
    _write(root / "intel-rapl:0" / "name", "package-0")
    _write(root / "intel-rapl:0" / "energy_uj", energy_uj)
    _write(root / "intel-rapl:0" / "max_energy_range_uj", max_uj)
    _write(root / "intel-rapl:0:0" / "name", "core")         # sub-zone: inside package-0, must not be added
    _write(root / "intel-rapl:0:0" / "energy_uj", 999999)
    _write(root / "intel-rapl:0:0" / "max_energy_range_uj", max_uj)
    return root


def test_rapl_counts_package_zone_only(tmp_path):
    root = _rapl_tree(tmp_path, 1_000_000)
    meter = E.RaplMeter(root)
    assert meter.kind == "energy" and "package-0" in meter.boundary
    assert meter.read() == 0.0
    _write(root / "intel-rapl:0" / "energy_uj", 3_500_000)
    _write(root / "intel-rapl:0:0" / "energy_uj", 5_000_000)
    assert meter.read() == pytest.approx(2.5, abs=1e-9)


def test_rapl_wraparound(tmp_path):
    max_uj = 10_000_000
    root = _rapl_tree(tmp_path, max_uj - 1_000, max_uj)
    meter = E.RaplMeter(root)
    _write(root / "intel-rapl:0" / "energy_uj", 500)          # wrapped: 1000 to the top, then 500
    assert meter.read() == pytest.approx(1_500e-6, abs=1e-12)
    _write(root / "intel-rapl:0" / "energy_uj", 2_500)
    assert meter.read() == pytest.approx(3_500e-6, abs=1e-12)


def test_rapl_missing_permission(tmp_path, monkeypatch):
    root = _rapl_tree(tmp_path, 1_000)
    real = Path.read_text

    def read_text(self, *a, **kw):   # root ignores file modes, so simulate the kernel's 0400 root:root
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(E.MeterUnavailable, match="readable only by root"):
        E.RaplMeter(root)
    with pytest.raises(UserError, match=r"--energy rapl: .*readable only by root.*chmod"):
        E.open_meter("rapl", roots={"rapl": str(root)})
    meter, skipped = E.auto_meter(roots={"rapl": str(root), "jetson": str(tmp_path / "none"),
                                         "android": str(tmp_path / "none")})
    assert meter is None or meter.name == "pi5-pmic"
    assert any("readable only by root" in s for s in skipped)


def test_rapl_absent(tmp_path):
    with pytest.raises(E.MeterUnavailable, match="no RAPL zones"):
        E.RaplMeter(tmp_path)


# ---------------------------------------------------------------------------------------------- Pi 5
def test_pmic_pairs_rails_by_name():
    rails = E.parse_pmic_adc(PMIC_OUTPUT)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "1V8_SYS", "DDR_VDD2", "DDR_VDDQ", "1V1_SYS", "0V8_SW", "VDD_CORE",
                          "3V3_DAC", "0V8_AON", "HDMI"}
    assert rails["VDD_CORE"] == (0.732, 0.721211)
    assert "EXT5V" not in rails and "BATT" not in rails
    meter = E.Pi5PmicMeter(runner=lambda: PMIC_OUTPUT)
    expected = (0.00390372 * 3.743405 + 0.0556308 * 3.308436 + 0.1717716 * 1.798914 + 0.0195186 * 1.113558
                + 0.0 * 0.6054594 + 0.146394 * 1.109892 + 0.3122673 * 0.8002464 + 0.732 * 0.721211
                + 0.00018315 * 3.304769 + 0.0029304 * 0.8003685 + 0.0208518 * 5.145)
    assert meter.read() == pytest.approx(expected, rel=1e-12)
    assert "internal rails" in meter.boundary and "5 V input" in meter.boundary


def test_pmic_order_of_lines_does_not_matter():
    shuffled = "\n".join(reversed(PMIC_OUTPUT.splitlines()))
    assert E.parse_pmic_adc(shuffled) == E.parse_pmic_adc(PMIC_OUTPUT)


def test_pmic_without_rails_is_unavailable():
    with pytest.raises(E.MeterUnavailable, match="Pi 4"):
        E.Pi5PmicMeter(runner=lambda: "error=1 error_msg=\"Command not registered\"\n")


# ---------------------------------------------------------------------------------------------- Android
def _battery(root: Path, ua: int, uv: int, status: str = "Discharging") -> Path:
    _write(root / "current_now", ua)
    _write(root / "voltage_now", uv)
    _write(root / "status", status)
    return root


def test_android_sysfs(tmp_path):
    root = _battery(tmp_path / "battery", -1_234_567, 3_987_000)
    meter = E.AndroidBatteryMeter(root=str(root))
    assert meter.read() == pytest.approx(1.234567 * 3.987, rel=1e-12)
    assert not any("Charging" in n for n in meter.notes())
    assert "battery" in meter.boundary


def test_android_charging_is_flagged(tmp_path):
    root = _battery(tmp_path / "battery", 800_000, 4_100_000, status="Charging")
    assert any("unplug" in n for n in E.AndroidBatteryMeter(root=str(root)).notes())


def test_android_over_adb_stream(tmp_path):
    fake = tmp_path / "adb"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        # fake adb: checks the command line, then streams what the shell loop would print
        [ "$1" = "-s" ] && shift 2
        [ "$1" = "shell" ] || { echo "bad args: $*" >&2; exit 1; }
        case "$2" in *current_now*voltage_now*) ;; *) echo "bad loop: $2" >&2; exit 1;; esac
        while true; do echo -500000; echo 4000000; echo .; sleep 0.02; done
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    meter = E.AndroidBatteryMeter(adb=str(fake), serial="emulator-5554")
    try:
        assert meter.via == "adb"
        assert meter.read() == pytest.approx(2.0, rel=1e-12)
    finally:
        meter.close()


def test_android_needs_the_phone(tmp_path):
    with pytest.raises(UserError, match="android:adb reads a phone"):
        E.open_meter("android:adb")
    with pytest.raises(UserError, match="to measure a phone, run the model there"):
        E.open_meter("android", roots={"android": str(tmp_path / "absent")})


# ---------------------------------------------------------------------------------------------- Jetson
def _ina(root: Path, channels: dict[int, tuple[str, int, int]]) -> Path:
    base = root / "1-0040" / "hwmon" / "hwmon3"
    for idx, (label, mv, ma) in channels.items():
        _write(base / f"in{idx}_label", label)
        _write(base / f"in{idx}_input", mv)
        _write(base / f"curr{idx}_input", ma)
    return root


def test_jetson_prefers_module_input(tmp_path):
    root = _ina(tmp_path / "ina3221", {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 400),
                                       3: ("VDD_SOC", 5000, 300)})
    meter = E.JetsonIna3221Meter(root)
    assert meter.read() == pytest.approx(6.0, rel=1e-12)
    assert "VDD_IN" in meter.boundary


def test_jetson_sums_rails_without_vdd_in(tmp_path):
    root = _ina(tmp_path / "ina3221", {1: ("VDD_GPU", 19000, 100), 2: ("VDD_CPU", 19000, 200), 3: ("NC", 0, 0)})
    meter = E.JetsonIna3221Meter(root)
    assert meter.read() == pytest.approx(19.0 * 0.3, rel=1e-12)
    assert "VDD_GPU" in meter.boundary and "NC" not in meter.boundary


# ---------------------------------------------------------------------------------------------- NVML via ctypes
FAKE_NVML = r"""
#include <string.h>
static unsigned long long energy_mj = 1000000ULL;
static int supported = SUPPORTED;
int nvmlInit_v2(void) { return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) { if (i != 0) return 2; *h = (void *)0x1; return 0; }
int nvmlDeviceGetName(void *h, char *buf, unsigned int n) { strncpy(buf, "Fake H100", n); return 0; }
int nvmlDeviceGetTotalEnergyConsumption(void *h, unsigned long long *mj) {
    if (!supported) return 3; energy_mj += 250; *mj = energy_mj; return 0; }
int nvmlDeviceGetPowerUsage(void *h, unsigned int *mw) { *mw = 71500; return 0; }
const char *nvmlErrorString(int rc) { return rc == 2 ? "Invalid Argument" : "Not Supported"; }
"""


def _fake_nvml(tmp_path: Path, supported: bool) -> str:
    src = tmp_path / "fake_nvml.c"
    src.write_text(FAKE_NVML.replace("SUPPORTED", "1" if supported else "0"))
    lib = tmp_path / f"libnvidia-ml-{int(supported)}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return str(lib)


def test_nvml_ctypes_energy_counter(tmp_path):
    meter = E.NvmlMeter(0, library=_fake_nvml(tmp_path, True))
    assert meter.kind == "energy" and "Fake H100" in meter.boundary
    first = meter.read()
    assert meter.read() - first == pytest.approx(0.25, abs=1e-12)   # 250 mJ per read in the fake


def test_nvml_ctypes_falls_back_to_power(tmp_path):
    meter = E.NvmlMeter(0, library=_fake_nvml(tmp_path, False))
    assert meter.kind == "power"
    assert meter.read() == pytest.approx(71.5)


def test_nvml_errors_are_one_line(tmp_path):
    with pytest.raises(E.MeterUnavailable, match="Invalid Argument"):
        E.NvmlMeter(3, library=_fake_nvml(tmp_path, True))
    with pytest.raises(E.MeterUnavailable, match="no NVIDIA driver"):
        E.NvmlMeter(0, library=str(tmp_path / "missing.so"))


# ---------------------------------------------------------------------------------------------- CSV log
def test_csv_power_log_window(tmp_path):
    log = tmp_path / "usb.csv"
    rows = ["timestamp,voltage_v,current_a"] + [f"{100 + i * 0.05:.2f},5.0,{0.4 if i < 40 else 0.8}" for i in range(121)]
    log.write_text("\n".join(rows) + "\n")
    meter = E.CsvMeter(log)
    idle = meter.window(100.0, 101.9)                    # 2 W flat
    assert idle["joules"] == pytest.approx(2.0 * 1.9, rel=1e-9)
    busy = meter.window(102.5, 105.5)                    # 4 W flat
    assert busy["joules"] == pytest.approx(4.0 * 3.0, rel=1e-9)
    assert busy["hz"] == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(UserError, match="clock synchronised"):
        meter.window(200.0, 201.0)


def test_csv_cumulative_energy_and_iso_time(tmp_path):
    log = tmp_path / "meter.csv"
    log.write_text("time,energy_wh\n2026-01-01T00:00:00+00:00,1.000\n2026-01-01T00:00:10+00:00,1.001\n"
                   "2026-01-01T00:00:20+00:00,1.002\n")
    t0 = 1767225600.0
    assert E.CsvMeter(log).window(t0, t0 + 20)["joules"] == pytest.approx(0.002 * 3600, rel=1e-9)


def test_csv_bad_header(tmp_path):
    log = tmp_path / "bad.csv"
    log.write_text("time,temperature\n1,2\n")
    with pytest.raises(UserError, match="power column"):
        E.CsvMeter(log)


# ---------------------------------------------------------------------------------------------- protocol
class _FakeBoard(E.Meter):
    """A power meter whose reading is 1.5 W at rest and 4 W while ``busy`` is set."""

    name, kind, boundary = "fake", "power", "fake board"

    def __init__(self, interleaved=False):
        self.busy = threading.Event()
        self.interleaved = interleaved
        self.reads = 0

    def read(self):
        self.reads += 1
        return 4.0 if self.busy.is_set() else 1.5


def _busy_work(meter, seconds, n):
    def work(tick):
        meter.busy.set()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tick()
            time.sleep(0.005)
        meter.busy.clear()
        return n
    return work


@pytest.mark.parametrize("interleaved", [False, True])
def test_measure_subtracts_idle(interleaved):
    meter = _FakeBoard(interleaved)
    out = E.measure(meter, _busy_work(meter, 1.0, 300), idle_seconds=0.4, hz=20)
    assert out["idle_watts"] == pytest.approx(1.5, rel=1e-9)
    # the first and last trapezoids straddle the switch between 1.5 W and 4 W: up to one 50 ms sample period
    # at each end of the ~1 s window is integrated as a ramp, so allow 2 x 0.05 / 1.0 = 10% (+ slack)
    expected = 2.5 * out["window_seconds"] / 300
    assert out["joules_per_inference"] == pytest.approx(expected, rel=0.15)
    assert out["joules_per_inference"] <= expected * (1 + 1e-9)   # ramps only ever lose energy
    assert out["sample_hz"] >= 10
    assert out["estimate"] is False and out["boundary"] == "fake board"


def test_measure_counter_meter_with_wrap(tmp_path):
    max_uj = 5_000_000
    root = _rapl_tree(tmp_path, max_uj - 200_000, max_uj)
    meter = E.RaplMeter(root)
    state = {"uj": max_uj - 200_000, "t": time.perf_counter(), "watts": 2.0}
    real_raw = meter._raw

    def raw(i):  # the counter advances with wall time at the current power and wraps at max_uj
        now = time.perf_counter()
        state["uj"] = (state["uj"] + int((now - state["t"]) * state["watts"] * 1e6)) % max_uj
        state["t"] = now
        _write(root / "intel-rapl:0" / "energy_uj", state["uj"])
        return real_raw(i)

    meter._raw = raw

    def work(tick):
        state["watts"] = 6.0
        time.sleep(0.5)
        state["watts"] = 2.0
        return 100

    out = E.measure(meter, work, idle_seconds=0.3, hz=20)
    assert out["idle_watts"] == pytest.approx(2.0, rel=0.05)
    assert out["window_joules"] == pytest.approx(6.0 * out["window_seconds"], rel=0.1)   # wrapped at least once
    assert out["joules_per_inference"] == pytest.approx(4.0 * out["window_seconds"] / 100, rel=0.15)


def test_estimate_is_labelled():
    device = {"idle_watts": 2.9, "active_watts_per_core": 1.4}
    est = E.estimate(device, False, 4, 0.010, "rpi5")
    assert est["estimate"] is True and est["source"] == "estimate"
    assert est["joules_per_inference"] == pytest.approx(1.4 * 4 * 0.010)
    assert "estimate" in est["boundary"] and "not a measurement" in est["boundary"]
    gpu = E.estimate({"idle_watts": 0.5, "active_watts_per_core": 0.6, "gpu_active_watts": 2.5}, True, 4, 0.02, "adreno")
    assert gpu["joules_per_inference"] == pytest.approx((2.5 + 0.6) * 0.02)
