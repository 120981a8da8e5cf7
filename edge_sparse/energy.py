"""Energy meters and the measurement protocol behind ``edge-sparse bench --energy``.

Each meter reads one real source and says which *boundary* it measures (what is inside the number):

=============  =====================================================  ==========================================
name           source                                                 boundary
=============  =====================================================  ==========================================
``rapl``       ``/sys/class/powercap/intel-rapl:N/energy_uj`` (µJ,     CPU package(s): cores + uncore (+ iGPU);
               wraps at ``max_energy_range_uj``; root only on recent   not DRAM, not the board
               kernels)
``pi5-pmic``   ``vcgencmd pmic_read_adc``: ``<RAIL>_A current(..)=``   Raspberry Pi 5 internal PMIC rails (sum of
               paired with ``<RAIL>_V volt(..)=`` by rail name          I x V); not the 5 V input, USB/HAT loads or
                                                                      regulator losses (a Pi 4 needs a USB meter)
``android``    ``/sys/class/power_supply/battery/{current_now,         the whole phone from its battery (SoC,
               voltage_now}`` (µA, µV) read locally, through the TVM    display, radios); unplug USB power
               RPC session, or (``android:adb``) streamed by adb
``jetson``     INA3221 hwmon ``in*_label``, ``in*_input`` (mV),         ``VDD_IN`` (module input) when present,
               ``curr*_input`` (mA)                                      else the sum of the listed rails
``nvml``       NVML ``nvmlDeviceGetTotalEnergyConsumption`` (mJ)        the NVIDIA GPU board (chip + its memory);
               via pynvml or ctypes on ``libnvidia-ml.so.1``            not the host CPU or DRAM
``csv:FILE``   an external meter's log (time + W, or V and A, or a      whatever that meter is wired to (a USB meter:
               cumulative J/Wh/mWh column)                              the device's USB input)
=============  =====================================================  ==========================================

Protocol (:func:`measure`): sample the meter at ``hz`` (default 20, never below 10) in a background thread -- or
between chunks of work when the meter shares the benchmark's single RPC session -- first for ``idle_seconds`` with
nothing running (idle power), then over the timed window. Energy per inference is
``(window energy - idle watts x window seconds) / inferences``; the gross ``window energy / inferences`` is reported
next to it. Counter meters (RAPL, NVML) give window energy as a counter difference (unwrapped); power meters are
integrated with the trapezoid rule.

With no meter, :func:`estimate` gives a figure from the target preset's energy model (``device.idle_watts``,
``device.active_watts_per_core``, ``device.gpu_active_watts``); it is marked ``"estimate": true`` and every printed
line says *estimate*.
"""
from __future__ import annotations

import csv
import ctypes
import glob
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from edge_sparse.errors import UserError

__all__ = [
    "METERS", "MeterUnavailable", "Meter", "RaplMeter", "Pi5PmicMeter", "AndroidBatteryMeter", "JetsonIna3221Meter",
    "NvmlMeter", "CsvMeter", "parse_pmic_adc", "open_meter", "auto_meter", "measure", "estimate", "energy_model",
]

METERS = ("rapl", "pi5-pmic", "android", "android:adb", "jetson", "nvml", "csv:FILE")
MIN_HZ = 10.0


class MeterUnavailable(Exception):
    """This meter cannot be read here (absent, no permission); ``auto`` moves on, an explicit choice fails."""


class Meter:
    """A live meter. ``kind`` is ``"energy"`` (``read()`` -> cumulative joules, unwrapped) or ``"power"``
    (``read()`` -> watts now)."""

    name = "meter"
    kind = "power"
    boundary = ""
    interleaved = False      # True: must be read between chunks of work (shares the benchmark's RPC session)

    def read(self) -> float:
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- RAPL
class RaplMeter(Meter):
    """Linux powercap RAPL package domains (top-level ``intel-rapl:N`` zones; sub-zones would double count)."""

    name = "rapl"
    kind = "energy"

    def __init__(self, root: str | os.PathLike = "/sys/class/powercap"):
        self.root = Path(root)
        zones = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            raise MeterUnavailable(f"no RAPL zones under {self.root} (not an x86 Linux host, or powercap is off)")
        named = [(z, _read_text(z / "name", "")) for z in zones]
        packages = [z for z, n in named if n.startswith("package")]
        self.zones = packages or zones
        self.boundary = ("CPU package(s) via RAPL (" + ", ".join(_read_text(z / "name", z.name) for z in self.zones)
                         + "): cores, caches, uncore, integrated GPU; not DRAM or the rest of the board")
        self.max_range = []
        for z in self.zones:
            try:
                self.max_range.append(int(_read_text(z / "max_energy_range_uj")))
            except (ValueError, MeterUnavailable):
                raise MeterUnavailable(f"{z}/max_energy_range_uj is missing or unreadable") from None
        self._last = [self._raw(i) for i in range(len(self.zones))]
        self._total_uj = 0

    def _raw(self, i: int) -> int:
        path = self.zones[i] / "energy_uj"
        try:
            return int(path.read_text().strip())
        except PermissionError:
            raise MeterUnavailable(
                f"{path} is readable only by root on this kernel (a 2020 security fix, CVE-2020-8694); run as root or "
                f"'sudo chmod a+r {self.root}/intel-rapl:*/energy_uj', or choose another --energy") from None
        except (OSError, ValueError) as e:
            raise MeterUnavailable(f"cannot read {path}: {e}") from None

    def read(self) -> float:
        for i in range(len(self.zones)):
            raw = self._raw(i)
            delta = raw - self._last[i]
            if delta < 0:  # the counter wrapped at max_energy_range_uj (sampling >= 10 Hz sees at most one wrap)
                delta += self.max_range[i]
            self._total_uj += delta
            self._last[i] = raw
        return self._total_uj * 1e-6


# ---------------------------------------------------------------------------------------------- Raspberry Pi 5
_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=\s*(?P<value>[-+0-9.eE]+)\s*[AV]?\s*$")


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """``vcgencmd pmic_read_adc`` output -> {rail: (amps, volts)} for rails that have both (``EXT5V_V``, a voltage
    without a current, is left out)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m["unit"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: (amps[rail], volts[rail]) for rail in amps if rail in volts}


class Pi5PmicMeter(Meter):
    name = "pi5-pmic"

    def __init__(self, runner: Callable[[], str] | None = None):
        if runner is None:
            exe = shutil.which("vcgencmd")
            if exe is None:
                raise MeterUnavailable("vcgencmd not found (not a Raspberry Pi 5, or the firmware tools are missing)")

            def runner() -> str:
                done = subprocess.run([exe, "pmic_read_adc"], capture_output=True, text=True, timeout=5)
                if done.returncode != 0:
                    raise MeterUnavailable(f"'vcgencmd pmic_read_adc' failed: {done.stderr.strip() or done.stdout.strip()}")
                return done.stdout
        self._runner = runner
        rails = parse_pmic_adc(self._runner())
        if not rails:
            raise MeterUnavailable("'vcgencmd pmic_read_adc' printed no rail currents (a Pi 4 or older has no PMIC ADC; "
                                   "use a USB meter and --energy csv:FILE)")
        self.rails = sorted(rails)
        self.boundary = (f"Raspberry Pi 5 PMIC internal rails, sum of I x V over {len(rails)} rails "
                         f"({', '.join(self.rails)}); excludes the 5 V input, USB/HAT loads and regulator losses")

    def read(self) -> float:
        rails = parse_pmic_adc(self._runner())
        return sum(a * v for a, v in rails.values())


# ---------------------------------------------------------------------------------------------- Android
class AndroidBatteryMeter(Meter):
    """Battery ``current_now`` (µA) x ``voltage_now`` (µV). Source: this machine's sysfs (``root``), ``adb`` (a
    streaming ``adb shell`` loop, so sampling is not limited by adb's per-call latency) or a TVM RPC session
    (``remote.download`` of the sysfs files, read between chunks of work)."""

    name = "android"

    def __init__(self, *, root: str = "/sys/class/power_supply/battery", adb: str | None = None,
                 serial: str | None = None, remote=None):
        self.root = root.rstrip("/")
        self._notes: list[str] = []
        self._proc = None
        self._latest: tuple[float, float] | None = None
        self._error: str | None = None
        if remote is not None:
            self.via = "rpc"
            self.interleaved = True
            self._remote = remote
        elif adb is not None:
            self.via = "adb"
            self._start_adb(adb, serial)
        else:
            self.via = "sysfs"
        self.boundary = (f"Android battery ({self.root}, via {self.via}): the whole phone -- SoC, memory, display, radios; "
                         "valid only on battery power")
        status = self._status()
        if status.lower() in ("charging", "full"):
            self._notes.append(f"battery status is '{status}': with USB power connected current_now measures charging, "
                               "not the load; unplug and use adb over Wi-Fi or RPC")
        self._notes.append("current_now sign differs between drivers; its magnitude is used")
        self.read()  # fail now, not inside the timed window

    # -- sources
    def _file(self, name: str) -> str:
        path = f"{self.root}/{name}"
        if self.via == "rpc":
            try:
                return bytes(self._remote.download(path)).rstrip(b"\x00").decode().strip()
            except Exception as e:  # the server raises a generic RPCError
                raise MeterUnavailable(f"cannot read {path} on the RPC device: {str(e).splitlines()[-1]}") from None
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise MeterUnavailable(f"cannot read {path}: {e.strerror or e}") from None

    def _status(self) -> str:
        if self.via == "adb":
            return ""
        try:
            return self._file("status")
        except MeterUnavailable:
            return ""

    def _start_adb(self, adb: str, serial: str | None) -> None:
        exe = shutil.which(adb) or (adb if os.path.exists(adb) else None)
        if exe is None:
            raise MeterUnavailable(f"adb not found ('{adb}'); install platform-tools or pass the RPC device")
        loop = (f"while true; do cat {self.root}/current_now {self.root}/voltage_now || exit 1; "
                f"echo .; sleep 0.03; done")
        cmd = [exe, *(["-s", serial] if serial else []), "shell", loop]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = threading.Event()

        def pump():
            vals: list[str] = []
            for line in self._proc.stdout:
                line = line.strip()
                if line == ".":
                    if len(vals) == 2:
                        try:
                            self._latest = (float(vals[0]), float(vals[1]))
                            got.set()
                        except ValueError:
                            self._error = f"adb printed {vals!r}, not numbers"
                    vals = []
                elif line:
                    vals.append(line)
            self._error = self._error or (self._proc.stderr.read().strip() or "adb shell loop ended")
            got.set()

        threading.Thread(target=pump, daemon=True, name="adb-battery").start()
        if not got.wait(10) or self._latest is None:
            self.close()
            raise MeterUnavailable(f"no battery readings over adb: {self._error or 'timed out'}")

    def _current_voltage(self) -> tuple[float, float]:
        if self.via == "adb":
            if self._error or self._latest is None:
                raise MeterUnavailable(f"adb battery reader stopped: {self._error}")
            return self._latest
        try:
            return float(self._file("current_now")), float(self._file("voltage_now"))
        except ValueError as e:
            raise MeterUnavailable(f"battery current_now/voltage_now is not a number: {e}") from None

    def read(self) -> float:
        micro_amps, micro_volts = self._current_voltage()
        return abs(micro_amps) * 1e-6 * micro_volts * 1e-6

    def notes(self) -> list[str]:
        return list(self._notes)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


# ---------------------------------------------------------------------------------------------- Jetson
class JetsonIna3221Meter(Meter):
    name = "jetson"

    def __init__(self, root: str | os.PathLike = "/sys/bus/i2c/drivers/ina3221"):
        self.channels: list[tuple[str, Path, Path]] = []   # (label, in*_input mV, curr*_input mA)
        for label_file in sorted(glob.glob(os.path.join(str(root), "*", "hwmon", "hwmon*", "in*_label"))):
            label = _read_text(label_file, "")
            idx = re.search(r"in(\d+)_label$", label_file).group(1)
            base = Path(label_file).parent
            volt, curr = base / f"in{idx}_input", base / f"curr{idx}_input"
            if label and label.upper() != "NC" and volt.exists() and curr.exists():
                self.channels.append((label, volt, curr))
        if not self.channels:
            raise MeterUnavailable(f"no INA3221 channels under {root} (not a Jetson, or an older L4T that exposes "
                                   "them through iio instead of hwmon)")
        total = [c for c in self.channels if c[0].upper() == "VDD_IN"]
        if total:  # the module input already contains every other rail
            self.channels = total
            self.boundary = "Jetson module input VDD_IN (CPU, GPU, memory and SoC; not the carrier board)"
        else:
            self.boundary = "Jetson INA3221 rails (sum): " + ", ".join(c[0] for c in self.channels)

    def read(self) -> float:
        watts = 0.0
        for _label, volt, curr in self.channels:
            try:
                watts += float(volt.read_text()) * 1e-3 * float(curr.read_text()) * 1e-3
            except (OSError, ValueError) as e:
                raise MeterUnavailable(f"cannot read {volt} / {curr}: {e}") from None
        return watts


# ---------------------------------------------------------------------------------------------- NVML
class NvmlMeter(Meter):
    """NVML total energy (mJ since the driver loaded) of GPU ``index``; falls back to power (mW) on GPUs without
    the counter (before Volta). pynvml when installed, else ctypes on ``libnvidia-ml.so.1``."""

    name = "nvml"
    kind = "energy"

    def __init__(self, index: int = 0, library: str | None = None):
        self.index = index
        self._api = None
        if library is None:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self._api = pynvml
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                self._handle = handle
                self._energy = lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
                self._power = lambda: int(pynvml.nvmlDeviceGetPowerUsage(handle))
                self.binding = f"pynvml {getattr(pynvml, '__version__', '')}".strip()
            except ImportError:
                pass
            except Exception as e:  # pynvml.NVMLError_*: no driver, no such GPU
                raise MeterUnavailable(f"NVML: {e}") from None
        if self._api is None:
            self._open_ctypes(library or "libnvidia-ml.so.1")
            name = self._name
        self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            self._energy()
        except Exception:
            self.kind = "power"
        self.boundary = (f"NVIDIA GPU {index} ({self.gpu_name}) board via NVML "
                         f"{'total energy counter' if self.kind == 'energy' else 'power readings'}: GPU chip and its "
                         "memory; not the host CPU, host DRAM or the PCIe host side")

    def _open_ctypes(self, library: str) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as e:
            raise MeterUnavailable(f"cannot load {library} (no NVIDIA driver here): {e}") from None

        def check(rc, what):
            if rc != 0:
                err = lib.nvmlErrorString
                err.restype = ctypes.c_char_p
                raise MeterUnavailable(f"NVML {what} failed: {err(rc).decode()} ({rc})")

        check(lib.nvmlInit_v2(), "nvmlInit_v2")
        handle = ctypes.c_void_p()
        check(lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(self.index), ctypes.byref(handle)),
              f"nvmlDeviceGetHandleByIndex({self.index})")
        buf = ctypes.create_string_buffer(96)
        check(lib.nvmlDeviceGetName(handle, buf, ctypes.c_uint(96)), "nvmlDeviceGetName")
        self._name = buf.value

        def energy() -> int:
            mj = ctypes.c_ulonglong()
            rc = lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj))
            if rc != 0:
                raise RuntimeError(f"nvmlDeviceGetTotalEnergyConsumption returned {rc}")
            return mj.value

        def power() -> int:
            mw = ctypes.c_uint()
            check(lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(mw)), "nvmlDeviceGetPowerUsage")
            return mw.value

        self._lib, self._energy, self._power = lib, energy, power
        self.binding = f"ctypes {library}"

    def read(self) -> float:
        if self.kind == "energy":
            return self._energy() * 1e-3
        return self._power() * 1e-3

    def notes(self) -> list[str]:
        return [f"NVML through {self.binding}"]


# ---------------------------------------------------------------------------------------------- CSV log
_TIME_COLS = ("time", "timestamp", "unix_time", "time_s", "epoch", "t")
_POWER_COLS = {"power_w": 1.0, "power": 1.0, "watts": 1.0, "w": 1.0, "power_mw": 1e-3, "mw": 1e-3}
_VOLT_COLS = {"voltage_v": 1.0, "voltage": 1.0, "volts": 1.0, "v": 1.0, "voltage_mv": 1e-3, "mv": 1e-3}
_CURR_COLS = {"current_a": 1.0, "current": 1.0, "amps": 1.0, "a": 1.0, "current_ma": 1e-3, "ma": 1e-3}
_ENERGY_COLS = {"energy_j": 1.0, "joules": 1.0, "j": 1.0, "energy_wh": 3600.0, "wh": 3600.0,
                "energy_mwh": 3.6, "mwh": 3.6}


class CsvMeter:
    """An external meter's CSV log, read after the fact for the idle and timed windows (by wall-clock time).

    Columns (header names, case-insensitive): a time column (``time``/``timestamp``/...: Unix seconds, or ISO 8601;
    without an offset it is this machine's local time), and one of: power (``power_w``, ``watts``, ``power_mw``),
    voltage and current (``voltage_v``+``current_a``, ``mv``+``ma``), or a cumulative energy (``energy_j``,
    ``energy_wh``, ``energy_mwh``). The logger must run on a clock synchronised with this machine.
    """

    name = "csv"
    kind = "log"
    interleaved = False

    def __init__(self, path: str | os.PathLike, boundary: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"energy log {self.path} not found; start the meter's logger first (--energy csv:FILE)")
        self.boundary = boundary or f"external meter logged to {self.path.name} (whatever it is wired to; a USB meter: the device's USB input)"
        self._parse()   # validates the header now

    def _parse(self) -> tuple[str, list[tuple[float, float]]]:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise UserError(f"energy log {self.path} is empty")
        header = [h.strip().lower() for h in rows[0]]
        col = {h: i for i, h in enumerate(header)}
        t_col = next((col[h] for h in _TIME_COLS if h in col), None)
        if t_col is None:
            raise UserError(f"energy log {self.path}: no time column (one of {', '.join(_TIME_COLS)}); header is {rows[0]}")

        def pick(table):
            return next(((col[h], s) for h, s in table.items() if h in col), None)

        energy, power, volt, curr = pick(_ENERGY_COLS), pick(_POWER_COLS), pick(_VOLT_COLS), pick(_CURR_COLS)
        if energy:
            kind, value = "energy", lambda r: float(r[energy[0]]) * energy[1]
        elif power:
            kind, value = "power", lambda r: float(r[power[0]]) * power[1]
        elif volt and curr:
            kind, value = "power", lambda r: float(r[volt[0]]) * volt[1] * float(r[curr[0]]) * curr[1]
        else:
            raise UserError(f"energy log {self.path}: needs a power column (power_w, watts, power_mw), voltage and current "
                            f"columns (voltage_v + current_a) or an energy column (energy_j, energy_wh); header is {rows[0]}")
        out = []
        for r in rows[1:]:
            if not r or not r[t_col].strip():
                continue
            try:
                out.append((_parse_time(r[t_col]), value(r)))
            except (ValueError, IndexError):
                continue  # a torn last line while the logger writes
        out.sort()
        return kind, out

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Energy (J) between wall-clock times t0 and t1, with the number and rate of log rows inside."""
        kind, rows = self._parse()
        inside = [r for r in rows if t0 <= r[0] <= t1]
        if len(inside) < 2:
            span = f"{rows[0][0]:.1f}..{rows[-1][0]:.1f}" if rows else "nothing"
            raise UserError(f"energy log {self.path} has {len(inside)} rows between {t0:.1f} and {t1:.1f} (it covers "
                            f"{span}): is the logger running, and is its clock synchronised with this machine?")
        pts = [(t0, _interp(rows, t0)), *[r for r in inside if t0 < r[0] < t1], (t1, _interp(rows, t1))]
        joules = pts[-1][1] - pts[0][1] if kind == "energy" else _trapezoid(pts)
        return {"joules": joules, "seconds": t1 - t0, "samples": len(inside),
                "hz": (len(inside) - 1) / max(inside[-1][0] - inside[0][0], 1e-9)}

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def _parse_time(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _interp(rows: list[tuple[float, float]], t: float) -> float:
    if t <= rows[0][0]:
        return rows[0][1]
    for (ta, va), (tb, vb) in zip(rows, rows[1:]):
        if ta <= t <= tb:
            return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)
    return rows[-1][1]


def _trapezoid(pts: list[tuple[float, float]]) -> float:
    return sum((tb - ta) * (va + vb) / 2 for (ta, va), (tb, vb) in zip(pts, pts[1:]))


def _read_text(path, default: str | None = None) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        if default is not None:
            return default
        raise MeterUnavailable(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------------------------------------- choosing
def open_meter(spec: str, *, remote=None, adb: str | None = None, roots: dict[str, str] | None = None):
    """A meter by name (see :data:`METERS`). ``remote``: the RPC session when benchmarking over RPC; then only
    ``android`` (battery files read through that session, between chunks of work), ``android:adb`` (the same files
    streamed by ``adb shell``; ``ANDROID_SERIAL`` picks the phone) and ``csv:FILE`` measure the remote device.
    ``roots`` overrides sysfs roots (tests, unusual layouts)."""
    roots = roots or {}
    if spec.startswith("csv:"):
        return CsvMeter(spec[4:])
    if remote is not None and spec not in ("android", "android:adb"):
        raise UserError(f"--energy {spec} reads this machine, not the RPC device; over RPC use --energy android "
                        "(battery files read through the RPC session), android:adb, csv:FILE (external meter) or none")
    try:
        if spec == "rapl":
            return RaplMeter(roots.get("rapl", "/sys/class/powercap"))
        if spec == "pi5-pmic":
            return Pi5PmicMeter()
        if spec in ("android", "android:adb"):
            # some phones name the fuel gauge differently (bms, max170xx_battery): EDGE_SPARSE_BATTERY overrides
            root = roots.get("android", os.environ.get("EDGE_SPARSE_BATTERY", "/sys/class/power_supply/battery"))
            if spec == "android:adb":
                if remote is None:
                    raise UserError("--energy android:adb reads a phone, but the model runs on this machine; "
                                    "benchmark on the phone with --rpc HOST:PORT")
                return AndroidBatteryMeter(root=root, adb=adb or "adb", serial=os.environ.get("ANDROID_SERIAL"))
            if remote is not None:
                return AndroidBatteryMeter(root=root, remote=remote)
            if not Path(root).exists():
                raise MeterUnavailable(f"no {root} on this machine; to measure a phone, run the model there "
                                       "(--rpc to its RPC server, or bench on the phone itself)")
            return AndroidBatteryMeter(root=root)
        if spec == "jetson":
            return JetsonIna3221Meter(roots.get("jetson", "/sys/bus/i2c/drivers/ina3221"))
        if spec == "nvml":
            return NvmlMeter(int(os.environ.get("EDGE_SPARSE_NVML_INDEX", "0")))
    except MeterUnavailable as e:
        raise UserError(f"--energy {spec}: {e}") from None
    raise UserError(f"unknown --energy '{spec}'; choose auto, none, estimate, {', '.join(METERS)}")


DEFAULT_METERS = ("jetson", "pi5-pmic", "android", "rapl")


def auto_meter(*, remote=None, order=DEFAULT_METERS, roots: dict[str, str] | None = None):
    """The first meter of ``order`` (the target family's ``energy_meters``) that reads the device the model runs on,
    or (None, [reasons it skipped]). Over RPC only the Android battery meter reads the remote device."""
    skipped: list[str] = []
    if remote is not None:
        order = ["android"]
    for name in order:
        try:
            return open_meter(name, remote=remote, roots=roots), skipped
        except (UserError, MeterUnavailable) as e:
            skipped.append(str(e))
    return None, skipped


# ---------------------------------------------------------------------------------------------- measuring
class _Recorder:
    """Samples a live meter at ``hz``: in a thread, or through ``tick()`` calls for interleaved meters."""

    def __init__(self, meter: Meter, hz: float):
        self.meter, self.period = meter, 1.0 / max(hz, MIN_HZ)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = None
        self._error: BaseException | None = None
        self._next = 0.0

    def _sample(self) -> None:
        self.samples.append((time.perf_counter(), self.meter.read()))

    def start(self) -> None:
        self._sample()
        self._next = time.perf_counter() + self.period
        if not self.meter.interleaved:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="energy-sampler")
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.0, self._next - time.perf_counter())):
            try:
                self._sample()
            except BaseException as e:  # surfaced by stop()
                self._error = e
                return
            self._next += self.period

    def tick(self) -> None:
        if self.meter.interleaved and time.perf_counter() >= self._next:
            self._sample()
            self._next = time.perf_counter() + self.period

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise UserError(f"energy meter {self.meter.name} failed while sampling: {self._error}")
        self._sample()
        s = self.samples
        seconds = s[-1][0] - s[0][0]
        if self.meter.kind == "energy":
            joules = s[-1][1] - s[0][1]
        else:
            joules = _trapezoid(s)
        return {"joules": joules, "seconds": seconds, "samples": len(s), "hz": (len(s) - 1) / max(seconds, 1e-9)}


def _record(meter, work: Callable[[Callable[[], None]], Any], hz: float) -> tuple[dict[str, float], Any]:
    if isinstance(meter, CsvMeter):
        t0 = time.time()
        result = work(lambda: None)
        t1 = time.time()
        deadline = time.time() + 3.0
        while True:  # give the logger time to write the rows up to t1
            _, rows = meter._parse()
            if (rows and rows[-1][0] >= t1) or time.time() > deadline:
                break
            time.sleep(0.2)
        return meter.window(t0, t1), result
    rec = _Recorder(meter, hz)
    rec.start()
    try:
        result = work(rec.tick)
    finally:
        window = rec.stop()
    return window, result


def idle_work(seconds: float) -> Callable[[Callable[[], None]], int]:
    def work(tick):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tick()
            time.sleep(0.01)
        return 0
    return work


def measure(meter, work: Callable[[Callable[[], None]], int], *, idle_seconds: float = 2.0, hz: float = 20.0,
            idle_watts: float | None = None) -> dict[str, Any]:
    """Idle power first (unless ``idle_watts`` is given), then the window around ``work(tick) -> inferences``.

    ``work`` must call ``tick()`` between chunks of at most ~50 ms when the meter is interleaved. Returns the
    ``energy`` section of the bench JSON (see docs/bench-schema.md)."""
    notes = list(meter.notes())
    if idle_watts is None:
        idle, _ = _record(meter, idle_work(idle_seconds), hz)
        idle_watts = idle["joules"] / max(idle["seconds"], 1e-9)
        idle_info = {"seconds": round(idle["seconds"], 3), "samples": idle["samples"], "hz": round(idle["hz"], 1)}
    else:
        idle_info = {"seconds": 0.0, "samples": 0, "hz": None, "reused": True}
    window, n = _record(meter, work, hz)
    if not n:
        raise UserError("the energy window ran no inferences")
    if window["hz"] < MIN_HZ and not isinstance(meter, CsvMeter):
        notes.append(f"sampled at {window['hz']:.1f} Hz, below {MIN_HZ:.0f} Hz: the meter is slow to read")
    if isinstance(meter, CsvMeter) and window["hz"] < MIN_HZ:
        notes.append(f"the log has {window['hz']:.1f} rows/s, below {MIN_HZ:.0f} Hz; lengthen the window (--min-seconds)")
    active = window["joules"] - idle_watts * window["seconds"]
    if active < 0:
        notes.append("window energy is below idle power x time: the model's energy is within the meter's noise")
    return {
        "source": meter.name,
        "estimate": False,
        "boundary": meter.boundary,
        "idle_watts": idle_watts,
        "idle": idle_info,
        "window_seconds": window["seconds"],
        "window_joules": window["joules"],
        "window_samples": window["samples"],
        "sample_hz": window["hz"],
        "mean_watts": window["joules"] / max(window["seconds"], 1e-9),
        "inferences": int(n),
        "joules_per_inference": active / n,
        "joules_per_inference_gross": window["joules"] / n,
        "formula": "(window_joules - idle_watts * window_seconds) / inferences",
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- estimate
def energy_model(device: dict[str, Any], offloads: bool, threads: int) -> dict[str, Any]:
    """The per-target energy model (documented in docs/bench-schema.md): watts above idle while a model runs.

    CPU presets: ``active_watts_per_core x threads``. Presets whose family offloads to a GPU
    (``TargetFamily.offloads``): ``gpu_active_watts`` plus one CPU core for the host thread that launches kernels.
    Idle: ``idle_watts`` (board at rest)."""
    idle = float(device.get("idle_watts", 0.0))
    per_core = float(device.get("active_watts_per_core", 0.0))
    if offloads:
        active = float(device.get("gpu_active_watts", 0.0)) + per_core
        formula = "gpu_active_watts + active_watts_per_core (host thread)"
    else:
        active = per_core * max(1, threads)
        formula = f"active_watts_per_core x threads ({threads})"
    return {"idle_watts": idle, "active_watts": active, "formula": formula}


def estimate(device: dict[str, Any], offloads: bool, threads: int, mean_latency_s: float,
             target: str = "") -> dict[str, Any]:
    """Energy per inference from the preset's energy model, labelled as an estimate."""
    model = energy_model(device, offloads, threads)
    if not model["active_watts"]:
        return {"source": "estimate", "estimate": True, "boundary": "none: the target preset has no energy model",
                "joules_per_inference": None, "notes": ["add idle_watts and active_watts_per_core to the preset's [device]"]}
    return {
        "source": "estimate",
        "estimate": True,
        "boundary": f"estimate from the '{target}' preset's energy model: {model['formula']} above idle "
                    f"({model['idle_watts']:g} W); not a measurement",
        "idle_watts": model["idle_watts"],
        "mean_watts": model["idle_watts"] + model["active_watts"],
        "joules_per_inference": model["active_watts"] * mean_latency_s,
        "joules_per_inference_gross": (model["idle_watts"] + model["active_watts"]) * mean_latency_s,
        "formula": "active_watts * mean_latency_s",
        "notes": ["ESTIMATE: no meter was read"],
    }
