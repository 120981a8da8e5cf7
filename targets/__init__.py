"""Target presets: a named TVM dict target plus what the device is (cores, vectors, caches, bandwidth, linking).

Presets ship as TOML files in ``presets/``; a user adds a device with a TOML file of the same schema
(``--target-file my_board.toml``), no code. ``host`` is built at run time from this machine's CPU.
Each preset names a *family*; the family (a :class:`~edge_sparse.targets.family.TargetFamily` in ``targets/<name>/``,
found by :func:`family_of`) owns everything family-specific for all presets of that family: pipeline, schedules,
sparse kernels and their names, linking, cost model, timing, tuning, default energy meter.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge_sparse.errors import UserError, closest
from edge_sparse.targets.family import TargetFamily, family_names, get_family, register_family
from edge_sparse.util import host_arch

__all__ = ["Preset", "get", "names", "presets", "load_file", "family_of", "TargetFamily", "register_family"]

PRESET_DIR = Path(__file__).parent / "presets"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str                      # a registered family's name (targets.family_names())
    arch: str                        # "x86_64" | "aarch64"
    target: dict[str, Any]           # TVM dict target
    host: dict[str, Any] | None      # TVM dict target of the host CPU (GPU families)
    device: dict[str, Any]           # cores, vector_bits, vector_registers, caches, mem_bw_gbps, energy model
    link: dict[str, Any]             # kind: host | cross | ndk; cxx; package
    source: str = "builtin"          # "builtin" | path of the TOML file

    # -- TVM objects
    def tvm_target(self):
        import tvm

        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)

    @property
    def cpu_target(self) -> dict[str, Any]:
        """The dict target of the CPU that runs the host code (the target itself for cpu presets)."""
        return self.host if self.host is not None else self.target

    @property
    def is_native(self) -> bool:
        """True when artifacts for this preset run on this machine."""
        return self.arch == host_arch() and self.link.get("kind") == "host"

    @property
    def cores(self) -> int:
        return int(self.device.get("cores", 1))

    @property
    def vector_bits(self) -> int:
        return int(self.device.get("vector_bits", 128))

    @property
    def vector_lanes_f32(self) -> int:
        return max(1, self.vector_bits // 32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_kb(level: int) -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0
    for idx in base.glob("index*"):
        try:
            if int((idx / "level").read_text()) != level or (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
            best = max(best, int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024)
        except (OSError, ValueError):
            continue
    return best


def _host_preset() -> Preset:
    """This machine's CPU, features detected by LLVM (via TVM) and /proc/cpuinfo."""
    arch = host_arch()
    flags = _cpu_flags()
    cores = os.cpu_count() or 1
    mcpu = None
    try:
        import tvm

        mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # TVM missing or too old: fall back to the generic CPU
        mcpu = None
    if arch == "x86_64":
        vector_bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
        registers = 32 if vector_bits == 512 else 16
        triple = "x86_64-linux-gnu"
    else:
        vector_bits, registers, triple = 128, 32, f"{arch}-linux-gnu"
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "num-cores": cores}
    if mcpu and mcpu != "generic":
        target["mcpu"] = mcpu
    device = {
        "cores": cores,
        "vector_bits": vector_bits,
        "vector_registers": registers,
        "l1d_kb": _cache_kb(1),
        "l2_kb": _cache_kb(2),
        "l3_kb": _cache_kb(3),
        "mem_bw_gbps": 40.0,
        "peak_gflops_per_core": 3.0 * 2 * (vector_bits // 32) * 2,
        "idle_watts": 10.0,
        "active_watts_per_core": 8.0,
    }
    return Preset(
        name="host",
        description=f"this machine: {arch}, {mcpu or 'generic'} CPU, {cores} cores, {vector_bits}-bit vectors",
        family="cpu",
        arch=arch,
        target=target,
        host=None,
        device=device,
        link={"kind": "host"},
    )


_REQUIRED = ("name", "family", "arch", "target")
_STRINGS = ("name", "description", "family", "arch")
_TABLES = ("target", "host", "device", "link")
# [device] numbers: (integer?, min, max)
_DEVICE_NUMBERS = {
    "cores": (True, 1, 1024), "vector_bits": (True, 32, 2048), "vector_registers": (True, 1, 256),
    "l1d_kb": (False, 0, 1 << 20), "l2_kb": (False, 0, 1 << 20), "l3_kb": (False, 0, 1 << 22),
    "mem_bw_gbps": (False, 0, 1e5), "peak_gflops_per_core": (False, 0, 1e6), "gpu_gflops": (False, 0, 1e7),
    "idle_watts": (False, 0, 1e4), "active_watts_per_core": (False, 0, 1e4), "gpu_active_watts": (False, 0, 1e4),
}


def _type_problem(data: dict[str, Any]) -> str | None:
    """What has the wrong type or range in a preset's TOML (None: nothing)."""
    import math

    for key in _STRINGS:
        if key in data and not isinstance(data[key], str):
            return f"'{key}' must be a string, got {data[key]!r}"
    for key in _TABLES:
        if key in data and not isinstance(data[key], dict):
            return f"'{key}' must be a [{key}] table, got {str(data[key])[:40]}"
    for key, value in data.get("device", {}).items():
        if key not in _DEVICE_NUMBERS:
            continue
        integer, lo, hi = _DEVICE_NUMBERS[key]
        ok_type = type(value) is int if integer else type(value) in (int, float)
        if not ok_type or not math.isfinite(value) or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            return f"[device] {key} must be {kind} in [{lo}, {hi:g}], got {value!r}"
    link = data.get("link", {})
    for key in ("kind", "cxx", "package"):
        if key in link and not isinstance(link[key], str):
            return f"[link] {key} must be a string, got {link[key]!r}"
    if "api_level" in link and (type(link["api_level"]) is not int or not 1 <= link["api_level"] <= 1000):
        return f"[link] api_level must be an integer Android API level, got {link['api_level']!r}"
    return None


def _from_toml(data: dict[str, Any], source: str) -> Preset:
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"target file {source}: missing key(s) {', '.join(missing)}; see targets/presets/rpi4.toml for the schema")
    if data["family"] not in family_names():
        raise UserError(f"target file {source}: family must be one of {', '.join(family_names())}, "
                        f"got '{data['family']}'")
    if not isinstance(data["target"], dict) or "kind" not in data["target"]:
        raise UserError(f"target file {source}: [target] must be a TVM dict target with a 'kind' (e.g. kind = \"llvm\")")
    problem = _type_problem(data)
    if problem:
        raise UserError(f"target file {source}: {problem}; see targets/presets/rpi4.toml for the schema")
    link = dict(data.get("link", {"kind": "host"}))
    return Preset(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        family=str(data["family"]),
        arch=str(data["arch"]),
        target=dict(data["target"]),
        host=dict(data["host"]) if "host" in data else None,
        device=dict(data.get("device", {})),
        link=link,
        source=source,
    )


def load_file(path: str | os.PathLike) -> Preset:
    """A preset from a user's TOML file (same schema as ``targets/presets/*.toml``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"target file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"target file {p} is not valid TOML: {e}") from None
    preset = _from_toml(data, str(p))
    try:
        preset.tvm_target()
    except Exception as e:  # TVM rejects the dict target
        raise UserError(f"target file {p}: TVM rejects the [target] table: {str(e).splitlines()[0]}") from None
    return preset


_BUILTIN: dict[str, Preset] | None = None


def presets() -> dict[str, Preset]:
    """All built-in presets by name (``host`` first)."""
    global _BUILTIN
    if _BUILTIN is None:
        found = {"host": _host_preset()}
        for f in sorted(PRESET_DIR.glob("*.toml")):
            p = _from_toml(tomllib.loads(f.read_text()), "builtin")
            found[p.name] = p
        _BUILTIN = found
    return dict(_BUILTIN)


def names() -> list[str]:
    return list(presets())


def get(name: str | Preset, target_file: str | os.PathLike | None = None) -> Preset:
    """A preset by name, or from ``target_file``; unknown names get the closest suggestion."""
    if isinstance(name, Preset):
        return name
    if target_file is not None:
        p = load_file(target_file)
        if name and name != p.name:
            raise UserError(f"--target '{name}' does not match the name '{p.name}' in {target_file}; drop --target or fix the file")
        return p
    if name and str(name).endswith(".toml"):
        return load_file(name)
    all_ = presets()
    if name not in all_:
        raise UserError(f"unknown target '{name}'{closest(str(name), all_)}; run 'edge-sparse targets' for the list, or pass --target-file FILE.toml")
    return copy.deepcopy(all_[name])


def family_of(preset: Preset) -> TargetFamily:
    """The :class:`TargetFamily` that compiles, times and measures for this preset."""
    return get_family(preset.family)


def cross_compiler_or_error(preset: Preset) -> str | None:
    """Path of the C++ compiler that links artifacts for ``preset``; None for the host compiler."""
    kind = preset.link.get("kind", "host")
    if kind == "host":
        return None
    if kind == "cross":
        cxx = preset.link.get("cxx", "aarch64-linux-gnu-g++")
        path = shutil.which(cxx)
        if path is None:
            pkg = preset.link.get("package", "g++-aarch64-linux-gnu")
            raise UserError(f"cross compiler '{cxx}' for target '{preset.name}' not found; install it with: sudo apt-get install {pkg}")
        return path
    return None
