"""Self-contained aarch64 bundles: the TVM runtime, a prebuilt runner and RUN.md beside a compiled model.

``make_bundle(out_dir, preset, manifest)`` is called by ``compile(..., bundle=True)`` for aarch64 presets. It adds:

- ``lib/libtvm_runtime.so``, ``lib/libtvm_ffi.so``: taken from the PyPI aarch64 wheels of exactly the TVM versions
  that compiled the model (``pip download``, cached under ``$EDGE_SPARSE_CACHE`` or ``~/.cache/edge-sparse``);
- ``bin/edge-sparse-run``: a C++ runner cross-compiled against those libraries (RPATH ``$ORIGIN/../lib``);
- ``include/`` (tvm_ffi + dlpack headers, ``edge_sparse.hpp``, ``npy.hpp``) and ``src/edge-sparse-run.cpp``,
  so an app (or the device itself) can build against the same runtime;
- ``RUN.md``: the commands to copy the directory to the device and run it.

The returned dict goes into ``manifest["bundle"]``. It records each runtime library's package, version and sha256;
the runner (``edge_sparse.hpp``) hashes the libraries the loader actually mapped and refuses to run when they are
not the ones of the TVM versions in ``manifest["tvm"]``.

Android (``link.kind == "ndk"``): PyPI has no Android build of the TVM runtime (the wheels are glibc/manylinux),
so the bundle carries the runner source, headers and RUN.md with the NDK commands instead of ``lib/`` and ``bin/``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from edge_sparse.errors import UserError
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_dir, atomic_path, sha256_bytes, sha256_file

__all__ = ["make_bundle", "runtime_files", "build_runner", "cache_dir", "android_link_command", "summary_lines",
           "RuntimeFiles",
           "RUNNER_SOURCES", "WHEEL_PLATFORM"]

RUNNER_DIR = Path(__file__).parent / "runner"
RUNNER_SOURCES = ("main.cpp", "edge_sparse.hpp", "npy.hpp")
# manylinux_2_28 is the tag of TVM's aarch64 wheels; pip also accepts older manylinux wheels under it.
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
BUNDLE_ARCH = "aarch64"
# The ffi wheel is per CPython version; its libtvm_ffi.so is the same C library for all of them. Fixing the tag
# makes every machine ship the same bytes (and the same sha256 in manifests).
WHEEL_PYTHON = "3.11"
_LIBS = {  # file in the bundle's lib/ -> (package, path inside the wheel)
    "libtvm_runtime.so": ("apache-tvm", "tvm/lib/libtvm_runtime.so"),
    "libtvm_ffi.so": ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so"),
}
_HEADER_ROOTS = ("tvm_ffi/include/tvm/", "tvm_ffi/include/dlpack/")
# sha256 of the aarch64 wheels a bundle may take its runtime from (PyPI's files of the pinned versions). A wheel in the
# cache is used only if its bytes are these: a file name proves nothing.
WHEEL_SHA256 = {
    ("apache-tvm", "0.27.0.post1"): "4acfdb7653e4e1ba7a707bdf2833db72eb8fda7d04d99141f2a4e1da43171fb7",
    ("apache-tvm-ffi", "0.1.14.post1"): "c7a759781d4fbf2b99fa12f2741f250b882b06acc2747bb02831d491d1ac7d3c",
    # the crashing release: only the test that the runner refuses a runtime of another version takes it
    ("apache-tvm-ffi", "0.1.15.post1"): "9135afc68c783de527bf16fdffbbecfd47b34b5b45ae8b5c7c6e21308593ac74",
}
RUNNER_FLAGS = ["-std=c++17", "-O2", "-s", "-fPIE", "-pie"]
# Self-contained bundles: ``run`` (the runner linked with a relative ELF interpreter) loads the glibc loader and C/C++
# libraries shipped in lib/sysroot (from the cross toolchain's sysroot), so it runs on any aarch64 Linux kernel
# (Android included, whatever its libc) from the bundle directory. DT_RPATH (not RUNPATH) so that an
# LD_LIBRARY_PATH set on the device cannot pull in its own libc; every C/C++ library is a direct NEEDED of ``run``
# so that the loader finds them all through its RPATH before the TVM libraries (RUNPATH $ORIGIN) ask for them.
LAUNCHER = "run"
SYSROOT_DIR = "lib/sysroot"
LOADER = "ld-linux-aarch64.so.1"
_STANDALONE_LINK = [f"-Wl,--dynamic-linker={SYSROOT_DIR}/{LOADER}", "-Wl,--disable-new-dtags",
                    f"-Wl,-rpath,$ORIGIN/{SYSROOT_DIR}:$ORIGIN/lib", "-Wl,--no-as-needed", "-l:libdl.so.2",
                    "-l:libpthread.so.0", "-lstdc++", "-lm", "-lgcc_s", "-lc"]   # (glibc >= 2.34: libdl/libpthread
                                                                               # are stubs with no libdl.so link)


def cache_dir() -> Path:
    """``$EDGE_SPARSE_CACHE`` or ``~/.cache/edge-sparse``."""
    return Path(os.environ.get("EDGE_SPARSE_CACHE") or Path.home() / ".cache" / "edge-sparse")


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclasses.dataclass(frozen=True)
class RuntimeFiles:
    """The aarch64 TVM runtime of one (tvm, tvm_ffi) version pair, extracted from the wheels into the cache."""

    root: Path                       # <cache>/aarch64-runtime/tvm-<v>_ffi-<v>
    tvm_version: str
    ffi_version: str
    wheels: dict[str, dict[str, str]]  # package -> {file, sha256}

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def include(self) -> Path:
        return self.root / "include"

    def library_info(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, (package, _) in _LIBS.items():
            p = self.lib / name
            out[f"lib/{name}"] = {
                "package": package,
                "version": self.tvm_version if package == "apache-tvm" else self.ffi_version,
                "sha256": sha256_file(p),
                "bytes": p.stat().st_size,
                "wheel": self.wheels[package]["file"],
            }
        return out


def _installed_versions() -> tuple[str, str]:
    import tvm
    import tvm_ffi

    return tvm.__version__, tvm_ffi.__version__


def _download_wheels(dest: Path, tvm_version: str, ffi_version: str, progress: Progress, manual_dir: Path) -> None:
    specs = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
           "--python-version", WHEEL_PYTHON, "--dest", str(dest), "--quiet", *specs]
    with progress.step(f"downloading the aarch64 wheels of {' and '.join(specs)} (about 100 MB, once)"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"could not download the aarch64 TVM runtime wheels ({' '.join(specs)}): {last}; "
                        f"check the network, or put both aarch64 .whl files into {manual_dir} by hand")


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*aarch64*.whl"))
    return found[0] if found else None


def _check_wheel(wheel: Path, package: str, version: str, wheels_dir: Path) -> str:
    """The wheel's sha256, which must be the pinned one for (package, version)."""
    want = WHEEL_SHA256.get((package, version))
    if want is None:
        known = ", ".join(f"{p}=={v}" for p, v in WHEEL_SHA256)
        raise UserError(f"no pinned sha256 for the aarch64 wheel of {package}=={version}; bundles use the pinned "
                        f"TVM versions ({known}): install those")
    have = sha256_file(wheel)
    if have != want:
        raise UserError(f"{wheel} is not PyPI's {package}=={version} wheel (sha256 {have[:16]}... != pinned "
                        f"{want[:16]}...); delete it from {wheels_dir} and let edge-sparse download it again")
    return have


def _header_dest(include: Path, name: str) -> Path | None:
    """Where a wheel member under _HEADER_ROOTS goes inside ``include`` (None: not a header member); a member path
    that would leave ``include`` (absolute, ``..``, backslashes) is refused."""
    if not name.startswith(_HEADER_ROOTS) or name.endswith("/"):
        return None
    rel = name[len("tvm_ffi/include/"):]
    parts = rel.split("/")
    if "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"wheel member {name[:120]!r} points outside the extraction directory; the wheel is not "
                        f"genuine: delete it from the cache and let edge-sparse download it again")
    dest = include.joinpath(*parts)
    if include.resolve() not in dest.resolve().parents:
        raise UserError(f"wheel member {name[:120]!r} points outside the extraction directory; delete the wheel")
    return dest


def _cached_libs_match(root: Path, wheels: dict[str, Path]) -> bool:
    """The extracted libraries are byte for byte the (verified) wheels' members."""
    for name, (package, member) in _LIBS.items():
        p = root / "lib" / name
        if not p.is_file():
            return False
        with zipfile.ZipFile(wheels[package]) as z:
            try:
                if sha256_bytes(z.read(member)) != sha256_file(p):
                    return False
            except KeyError:
                return False
    return True


def runtime_files(tvm_version: str | None = None, ffi_version: str | None = None, *,
                  quiet: bool | None = None) -> RuntimeFiles:
    """Fetch (once) and extract the aarch64 runtime libraries and tvm_ffi headers of these versions.

    Defaults are the versions installed here (the compiler's). Wheels may also be placed by hand into
    ``<cache>/wheels`` for offline machines.
    """
    if tvm_version is None or ffi_version is None:
        have_tvm, have_ffi = _installed_versions()
        tvm_version, ffi_version = tvm_version or have_tvm, ffi_version or have_ffi
    progress = Progress(quiet)
    cache = cache_dir()
    wheels_dir = cache / "wheels"
    root = cache / "aarch64-runtime" / f"tvm-{tvm_version}_ffi-{ffi_version}"
    packages = {"apache-tvm": tvm_version, "apache-tvm-ffi": ffi_version}
    wheels = {p: _find_wheel(wheels_dir, p, v) for p, v in packages.items()}
    if any(w is None for w in wheels.values()):
        wheels_dir.mkdir(parents=True, exist_ok=True)
        # download beside the cache and move whole files in: a concurrent run never sees a partial wheel
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
        try:
            _download_wheels(tmp, tvm_version, ffi_version, progress, wheels_dir)
            for w in tmp.glob("*.whl"):
                os.replace(w, wheels_dir / w.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        wheels = {p: _find_wheel(wheels_dir, p, v) for p, v in packages.items()}
        missing = [f"{p}=={v}" for p, v in packages.items() if wheels[p] is None]
        if missing:
            raise UserError(f"pip found no aarch64 wheel for {', '.join(missing)}; "
                            f"the bundle needs the runtime of exactly the compiler's TVM versions")
    wheel_info = {p: {"file": w.name, "sha256": _check_wheel(w, p, packages[p], wheels_dir)} for p, w in wheels.items()}
    if not (root / "include" / "tvm" / "ffi").is_dir() or not _cached_libs_match(root, wheels):
        with progress.step("extracting the aarch64 TVM runtime"):
            root.parent.mkdir(parents=True, exist_ok=True)
            if root.exists():  # an incomplete extraction from an interrupted run
                shutil.rmtree(root, ignore_errors=True)
            try:
                with atomic_dir(root, replace=False) as tmp:
                    (tmp / "lib").mkdir()
                    (tmp / "include").mkdir()
                    for name, (package, member) in _LIBS.items():
                        with zipfile.ZipFile(wheels[package]) as z:
                            try:
                                data = z.read(member)
                            except KeyError:
                                raise UserError(f"{wheels[package].name} has no {member}; delete it from {wheels_dir} "
                                                f"and let edge-sparse download it again") from None
                        (tmp / "lib" / name).write_bytes(data)
                    with zipfile.ZipFile(wheels["apache-tvm-ffi"]) as z:
                        for info in z.infolist():
                            dest = _header_dest(tmp / "include", info.filename)
                            if dest is None or info.is_dir():
                                continue
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(z.read(info))
            except FileExistsError:  # another process finished first: use its copy
                pass
    return RuntimeFiles(root=root, tvm_version=tvm_version, ffi_version=ffi_version, wheels=wheel_info)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return cxx
    return out.splitlines()[0].strip() if out else cxx


def _runner_command(cxx: str, runtime: RuntimeFiles, src_dir: Path, output: Path, version: str,
                    standalone: bool = False) -> list[str]:
    cmd = [cxx, *RUNNER_FLAGS, f"-DEDGE_SPARSE_RUNNER_VERSION=\"{version}\"", f"-I{src_dir}", f"-I{runtime.include}",
           str(src_dir / "main.cpp"), "-o", str(output), f"-L{runtime.lib}", "-Wl,--no-as-needed",
           "-ltvm_runtime", "-ltvm_ffi"]
    if standalone:
        return cmd + _STANDALONE_LINK
    return cmd + ["-Wl,--as-needed", "-ldl", "-Wl,-rpath,$ORIGIN/../lib"]


def build_runner(runtime: RuntimeFiles, cxx: str = "aarch64-linux-gnu-g++", *, quiet: bool | None = None,
                 standalone: bool = False) -> Path:
    """Cross-compile ``edge-sparse-run`` against ``runtime`` (cached by sources, compiler and runtime); with
    ``standalone`` the self-contained launcher ``run`` (loader and libraries from lib/sysroot)."""
    from edge_sparse import __version__

    path = shutil.which(cxx)
    if path is None:
        raise UserError(f"C++ cross compiler '{cxx}' not found; install it with: sudo apt-get install g++-aarch64-linux-gnu")
    key = hashlib.sha256()
    for name in RUNNER_SOURCES:
        key.update((RUNNER_DIR / name).read_bytes())
    key.update(_compiler_version(path).encode())
    key.update(" ".join(RUNNER_FLAGS + (_STANDALONE_LINK if standalone else [])).encode())
    key.update(__version__.encode())
    key.update(sha256_file(runtime.lib / "libtvm_ffi.so").encode())
    out = runtime.root / "runner" / key.hexdigest()[:16] / (LAUNCHER if standalone else "edge-sparse-run")
    if out.is_file():
        return out
    progress = Progress(quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, mode=0o777) as tmp:
        cmd = _runner_command(path, runtime, RUNNER_DIR, tmp, __version__, standalone)
        with progress.step(f"building the {'self-contained launcher' if standalone else 'runner'} with {cxx}"):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [l for l in proc.stderr.splitlines() if "error" in l][:3] or proc.stderr.splitlines()[-3:]
            raise RuntimeError("building edge-sparse-run failed:\n" + "\n".join(errors))
    return out


def _needed(readelf: str, path: Path) -> list[str]:
    """DT_NEEDED sonames of an ELF file."""
    proc = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{readelf} -d {path} failed: {proc.stderr.strip()[:200]}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout)


def sysroot_libraries(cxx: str, roots: list[Path]) -> dict[str, Path]:
    """The glibc loader and every C/C++ library ``roots`` need (transitively), as the toolchain's sysroot has them
    (``cxx -print-file-name``): soname -> real file. Libraries found next to the roots (the TVM ones) are left out."""
    readelf = shutil.which(cxx.replace("g++", "readelf")) or shutil.which("readelf")
    if readelf is None:
        raise UserError("readelf not found (binutils); install binutils-aarch64-linux-gnu")
    local = {p.name for p in roots}
    found: dict[str, Path] = {}
    todo = [*roots]
    wanted = [LOADER]
    while todo or wanted:
        if todo:
            wanted += _needed(readelf, todo.pop())
            continue
        name = wanted.pop()
        if name in found or name in local:
            continue
        out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not out or out == name or not Path(out).is_file():
            raise UserError(f"{cxx} has no {name} in its sysroot; install the cross toolchain's libc "
                            f"(libc6-arm64-cross, libstdc++6-arm64-cross)")
        found[name] = Path(out).resolve()
        todo.append(found[name])
    return found


def _glibc_needs(path: Path) -> dict[str, str]:
    """Highest GLIBC_/GLIBCXX_ symbol versions an ELF file needs (what the device's OS must provide)."""
    data = path.read_bytes()
    out = {}
    for key, pat in (("glibc", rb"GLIBC_(\d+\.\d+(?:\.\d+)?)"), ("glibcxx", rb"GLIBCXX_(\d+\.\d+(?:\.\d+)?)")):
        found = {m.decode() for m in re.findall(pat, data)}
        if found:
            out[key] = max(found, key=lambda v: tuple(int(x) for x in v.split(".")))
    return out


def _max_version(*versions: str | None) -> str | None:
    vs = [v for v in versions if v]
    return max(vs, key=lambda v: tuple(int(x) for x in v.split("."))) if vs else None


def _get(manifest, key: str):
    return manifest[key] if isinstance(manifest, dict) else getattr(manifest, key)


def _copy_sources(out_dir: Path, runtime: RuntimeFiles | None) -> None:
    include = out_dir / "include"
    if runtime is not None:
        shutil.copytree(runtime.include, include, dirs_exist_ok=True)
    include.mkdir(parents=True, exist_ok=True)
    for name in ("edge_sparse.hpp", "npy.hpp"):
        shutil.copy2(RUNNER_DIR / name, include / name)
    (out_dir / "src").mkdir(exist_ok=True)
    shutil.copy2(RUNNER_DIR / "main.cpp", out_dir / "src" / "edge-sparse-run.cpp")


def android_link_command(library: str = "model.tar", api_level: int = 28, output: str = "model.so") -> str:
    """The one shell command that links an exported object archive into ``model.so`` with the Android NDK."""
    clang = f'"$ANDROID_NDK_HOME"/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android{api_level}-clang++'
    return (f"mkdir -p objs && tar -xf {library} -C objs && {clang} -shared -fPIC -o {output} objs/*.o -lm")


def summary_lines(manifest: dict[str, Any], out_dir: str | os.PathLike, *, quiet: bool = False) -> list[str]:
    """What ``edge-sparse compile`` prints after the artifact line: bundle sizes, and for an unlinked Android
    archive the one command that links it (printed even with --quiet: the artifact is unusable without it)."""
    lines = []
    b = manifest.get("bundle") or {}
    s = b.get("sizes") or {}
    if not quiet and "runtime" in s:
        lines.append(f"bundle: model {_fmt_mb(s['model'])} + runtime {_fmt_mb(s['runtime'])} + runner "
                     f"{_fmt_mb(s['runner'])} = {_fmt_mb(s['device'])} on the device (include/ + src/ "
                     f"{_fmt_mb(s['sdk'])}); see {Path(out_dir) / 'RUN.md'}")
    if str(manifest.get("library", "")).endswith(".tar"):
        api = int(manifest.get("target", {}).get("link", {}).get("api_level", 28))
        lines.append(f"link it for Android (ANDROID_NDK_HOME was not set): cd {out_dir} && "
                     f"{android_link_command(manifest['library'], api)}")
    elif not quiet and b.get("kind") == "android-arm64":
        lines.append(f"Android bundle: build the TVM runtime with the NDK as {Path(out_dir) / 'RUN.md'} says")
    return lines


def check_bundle_target(preset) -> None:
    """UserError unless ``preset`` runs on the platform of the runtime wheels a bundle packs."""
    if preset.arch != BUNDLE_ARCH:
        raise UserError(f"--bundle packs the {BUNDLE_ARCH} runtime and runner; target '{preset.name}' is {preset.arch}")


def make_bundle(out_dir: str | os.PathLike, preset, manifest) -> dict[str, Any]:
    """Add the aarch64 runtime, runner, headers and RUN.md to the artifact in ``out_dir``; returns manifest["bundle"].

    ``out_dir`` already holds the linked model (``manifest.library``); ``manifest`` is the Manifest (or its dict)
    being written, whose ``tvm`` versions choose the runtime.
    """
    out_dir = Path(out_dir)
    check_bundle_target(preset)
    library = _get(manifest, "library")
    versions = _get(manifest, "tvm") or {}
    tvm_version, ffi_version = versions.get("version"), versions.get("ffi_version")
    model_bytes = (out_dir / library).stat().st_size
    kind = preset.link.get("kind", "host")
    if kind == "ndk":
        return _android_bundle(out_dir, preset, library, tvm_version, ffi_version, model_bytes)

    runtime = runtime_files(tvm_version, ffi_version)
    # compiling on an aarch64 machine itself (link kind "host"): its own g++ builds the runner
    cxx = preset.link.get("cxx") or ("g++" if kind == "host" and preset.is_native else "aarch64-linux-gnu-g++")
    runner = build_runner(runtime, cxx)
    (out_dir / "lib").mkdir(exist_ok=True)
    for name in _LIBS:
        shutil.copy2(runtime.lib / name, out_dir / "lib" / name)
    (out_dir / "bin").mkdir(exist_ok=True)
    shutil.copy2(runner, out_dir / "bin" / "edge-sparse-run")
    os.chmod(out_dir / "bin" / "edge-sparse-run", 0o755)
    _copy_sources(out_dir, runtime)
    standalone = _standalone(out_dir, runtime, cxx, library)

    libs = runtime.library_info()
    runtime_needs = {}
    for name in _LIBS:
        for k, v in _glibc_needs(out_dir / "lib" / name).items():
            runtime_needs[k] = _max_version(runtime_needs.get(k), v)
    runner_needs = _glibc_needs(out_dir / "bin" / "edge-sparse-run")
    sizes = {
        "model": model_bytes,
        "runtime": sum(v["bytes"] for v in libs.values()),
        "runner": (out_dir / "bin" / "edge-sparse-run").stat().st_size,
        "sdk": _tree_bytes(out_dir / "include") + _tree_bytes(out_dir / "src"),
    }
    sizes["device"] = sizes["model"] + sizes["runtime"] + sizes["runner"]   # what must be on the device
    sizes["standalone"] = standalone["bytes"]                                  # ./run + lib/sysroot on top of that
    info = {
        "format": 1,
        "kind": "linux-aarch64",
        "runtime": {"tvm": runtime.tvm_version, "tvm_ffi": runtime.ffi_version, "platform": WHEEL_PLATFORM,
                    "libraries": libs, "requires": runtime_needs},
        "runner": {"path": "bin/edge-sparse-run", "compiler": _compiler_version(shutil.which(cxx) or cxx),
                   "requires": runner_needs},
        "standalone": {k: v for k, v in standalone.items() if k != "bytes"},
        "sizes": sizes,
        "run": "RUN.md",
    }
    (out_dir / "RUN.md").write_text(_run_md_linux(out_dir, preset, _get(manifest, "inputs"), info))
    return info


def _standalone(out_dir: Path, runtime: RuntimeFiles, cxx: str, library: str) -> dict[str, Any]:
    """Add ``run`` and lib/sysroot (glibc loader, libc, libm, libstdc++, libgcc_s, ... from the toolchain's sysroot)."""
    launcher = build_runner(runtime, cxx, standalone=True)
    shutil.copy2(launcher, out_dir / LAUNCHER)
    os.chmod(out_dir / LAUNCHER, 0o755)
    sysroot = out_dir / SYSROOT_DIR
    sysroot.mkdir(parents=True, exist_ok=True)
    roots = [out_dir / LAUNCHER, *(out_dir / "lib" / n for n in _LIBS)]
    if library.endswith(".so"):
        roots.append(out_dir / library)
    libs = sysroot_libraries(shutil.which(cxx) or cxx, roots)
    for name, src in sorted(libs.items()):
        shutil.copyfile(src, sysroot / name)
        os.chmod(sysroot / name, 0o755)
    files = sorted([LAUNCHER, *(f"{SYSROOT_DIR}/{n}" for n in libs)])
    return {"launcher": LAUNCHER, "sysroot": SYSROOT_DIR, "loader": f"{SYSROOT_DIR}/{LOADER}",
            "libraries": sorted(libs), "source": str(Path(libs[LOADER]).parent),
            "bytes": sum((out_dir / f).stat().st_size for f in files)}


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _input_example(inputs) -> tuple[str, str]:
    arrays = ", ".join(f"{i['name']!r}: np.zeros({tuple(i['shape'])}, np.{i['dtype']})" for i in inputs)
    return ", ".join(i["name"] for i in inputs), "np.savez('inputs.npz', **{" + arrays + "})"


def _artifact_name(out_dir: Path) -> str:
    """The artifact's final directory name (compile builds it in a staging dir named ``.<name>.<random>.tmp``)."""
    name = out_dir.name
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:-4].rsplit(".", 1)[0] or "model"
    return name


def _run_md_linux(out_dir: Path, preset, inputs, info) -> str:
    name = _artifact_name(out_dir)
    s = info["sizes"]
    rt = info["runtime"]
    names, savez = _input_example(inputs)
    glibc = _max_version(rt["requires"].get("glibc"), info["runner"]["requires"].get("glibc"))
    return f"""# Running this model on {preset.name}

{preset.description}. This directory is self-contained: the compiled model (`model.so`), the TVM runtime
(`lib/`, from the aarch64 wheels of apache-tvm {rt['tvm']} and apache-tvm-ffi {rt['tvm_ffi']}) and a runner
(`bin/edge-sparse-run`). Nothing needs to be installed on the device.

Sizes: model {_fmt_mb(s['model'])}, runtime {_fmt_mb(s['runtime'])}, runner {_fmt_mb(s['runner'])}
(on the device: {_fmt_mb(s['device'])}); `include/` and `src/` ({_fmt_mb(s['sdk'])}) are only for building apps.

Requirements: a 64-bit (aarch64) Linux with glibc >= {glibc} (Raspberry Pi OS bookworm, Debian 12, Ubuntu 22.04 or
newer). The runtime libraries alone need glibc >= {rt['requires'].get('glibc', '?')}: on an older OS rebuild the runner
on the device (last section).

## Copy and run

```sh
scp -r {name} pi@raspberrypi.local:~/
ssh pi@raspberrypi.local
cd ~/{name}
./bin/edge-sparse-run --info                       # inputs, outputs, runtime versions (checked)
./bin/edge-sparse-run -i inputs.npz -o outputs.npz # inputs by name: {names}
./bin/edge-sparse-run --bench 100 --threads 4      # latency statistics (random inputs)
```

Make inputs with numpy (`{savez}`; use `np.savez`, not `savez_compressed`) or pass single arrays with
`-i NAME=FILE.npy`. Outputs: `np.load('outputs.npz')[NAME]`. Threads default to TVM's choice; set `--threads N` (or
`TVM_NUM_THREADS`).

Before loading, the runner checks `model.so` against its sha256 in `manifest.json`, and checks that the loaded
`libtvm_runtime.so`/`libtvm_ffi.so` are the ones of the TVM versions that compiled the model (by sha256; a
mismatch stops with an error instead of crashing later). Keep `lib/` next to `bin/` and do not set
`LD_LIBRARY_PATH` to another TVM.

## Without a board: under qemu on an x86 machine

```sh
sudo apt-get install qemu-user g++-aarch64-linux-gnu     # qemu-aarch64 and an aarch64 glibc in /usr/aarch64-linux-gnu
cd {name} && qemu-aarch64 ./run --info && qemu-aarch64 ./run --bench 20       # self-contained (next section)
qemu-aarch64 -L /usr/aarch64-linux-gnu {name}/bin/edge-sparse-run --bench 20   # the glibc runner
```

Emulated timings say nothing about the board's speed; use them to check that the bundle runs and matches.

## Any aarch64 Linux or Android phone, nothing installed, no NDK

`./run` is the same runner with its own C library: it starts through the glibc loader in `lib/sysroot/` (from the
cross toolchain's sysroot: {', '.join(info['standalone']['libraries'])}), so the device's libc (bionic on Android,
musl, an old glibc) does not matter. Start it from the bundle directory (its loader path is relative):

```sh
adb push {name} /data/local/tmp/
adb shell "cd /data/local/tmp/{name} && ./run --info && ./run --bench 50 --threads 4"
adb shell "cd /data/local/tmp/{name} && ./run -i inputs.npz -o outputs.npz" && adb pull /data/local/tmp/{name}/outputs.npz
```

It takes the same options as `bin/edge-sparse-run`. Adds {_fmt_mb(s['standalone'])} to what the device needs. For an
Android app, link the model with the NDK instead (`--target android-arm64`).

## Python on the device

```sh
pip install apache-tvm=={rt['tvm']} apache-tvm-ffi=={rt['tvm_ffi']} numpy
python3 -c "import edge_sparse.runtime as r; m = r.load('{name}'); print(m.run(m.make_inputs()))"
```

(`edge_sparse.runtime` needs only numpy and the TVM runtime; copy the `edge_sparse` package or `pip install edge-sparse --no-deps`.)

## In a C++ app

Copy `include/edge_sparse.hpp`; compile with `-std=c++17 -Iinclude`, link
`-Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed -ldl` (`--no-as-needed`: the app calls nothing in
libtvm_runtime itself, but the Relax VM that `model.so` needs lives there) and ship `lib/` with the app (see
examples/cpp in the edge-sparse repository):

```cpp
edge_sparse::Model model("{name}");
model.set_input("{inputs[0]['name']}", data, bytes);
model.run();
auto y = model.output<float>("...");
```

## Rebuilding the runner on the device

```sh
g++ -std=c++17 -O2 -Iinclude src/edge-sparse-run.cpp -o bin/edge-sparse-run \\
    -Llib -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed -ldl -Wl,-rpath,'$ORIGIN/../lib'
```
"""


def _android_bundle(out_dir: Path, preset, library: str, tvm_version, ffi_version, model_bytes: int) -> dict[str, Any]:
    api = int(preset.link.get("api_level", 28))
    try:
        runtime = runtime_files(tvm_version, ffi_version)   # for the tvm_ffi headers (same on Android)
    except UserError:
        runtime = None
    _copy_sources(out_dir, runtime)
    link_cmd = android_link_command(library, api) if library.endswith(".tar") else None
    info = {
        "format": 1,
        "kind": "android-arm64",
        "runtime": None,
        "tvm": {"version": tvm_version, "ffi_version": ffi_version},
        "link_command": link_cmd,
        "sizes": {"model": model_bytes, "sdk": _tree_bytes(out_dir / "include") + _tree_bytes(out_dir / "src")},
        "run": "RUN.md",
    }
    link_section = (f"""## 1. Link the model (no NDK was set at compile time)

```sh
export ANDROID_NDK_HOME=/path/to/android-ndk   # r25 or newer
{link_cmd}
```
""" if link_cmd else "## 1. The model is linked (`model.so`, NDK clang)\n")
    (out_dir / "RUN.md").write_text(f"""# Running this model on {preset.name} (Android)

PyPI publishes the TVM runtime for manylinux (glibc) only, so this bundle cannot carry a prebuilt Android runtime.
It holds the model, the runner source (`src/`), the C++ API (`include/edge_sparse.hpp`) and the tvm_ffi headers of
apache-tvm-ffi {ffi_version}.

{link_section}
## 2. Build the TVM runtime {tvm_version} for Android (once)

```sh
git clone --recursive --branch v0.27.0 https://github.com/apache/tvm && cd tvm && mkdir build && cd build
cmake .. -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK_HOME/build/cmake/android.toolchain.cmake \\
  -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-{api} -DANDROID_STL=c++_shared -DUSE_LLVM=OFF
make -j8 tvm_runtime      # libtvm_runtime.so and libtvm_ffi.so (ffi from 3rdparty/tvm-ffi)
```

## 3. Build the runner and run it with adb

```sh
CXX="$ANDROID_NDK_HOME"/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android{api}-clang++
mkdir -p lib bin && cp /path/to/tvm/build/lib*.so lib/
cp "$ANDROID_NDK_HOME"/toolchains/llvm/prebuilt/linux-x86_64/sysroot/usr/lib/aarch64-linux-android/libc++_shared.so lib/
$CXX -std=c++17 -O2 -Iinclude src/edge-sparse-run.cpp -o bin/edge-sparse-run -Llib -ltvm_runtime -ltvm_ffi \\
  -Wl,-rpath,'$ORIGIN/../lib'
adb push . /data/local/tmp/model
adb shell 'cd /data/local/tmp/model && ./bin/edge-sparse-run --bench 50'
```

A runtime built from source has no sha256 in `manifest.json`, so the runner checks the model's sha256 and the
tvm_ffi ABI version only. (These Android steps were not run by edge-sparse's CI: it has no NDK or device.)
""")
    return info
