"""Artifact directory format: the compiled library plus ``manifest.json``.

Imports only the standard library and numpy, so the device-side runtime can use it. Writing is atomic at the directory
level: the caller builds everything in :func:`edge_sparse.util.atomic_dir` and it is renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from edge_sparse.errors import UserError
from edge_sparse.util import atomic_write, sha256_file

__all__ = ["SCHEMA_VERSION", "MANIFEST", "Manifest", "read_manifest", "write_manifest",
           "file_entries", "verify_files", "library_path", "is_artifact"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclasses.dataclass
class Manifest:
    tool: dict[str, str]
    tvm: dict[str, str]
    target: dict[str, Any]
    library: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    source_model: dict[str, str]
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    compile: dict[str, Any] = dataclasses.field(default_factory=dict)
    bundle: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["bundle"] is None:
            del d["bundle"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def file_entries(root: Path, exclude=(MANIFEST,)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` (relative POSIX paths), manifest excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(root: Path, manifest: Manifest) -> None:
    manifest.files = file_entries(root)
    atomic_write(root / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"artifact directory not found: {root}; create one with 'edge-sparse compile MODEL.onnx -o {root}'")
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} has no {MANIFEST}; is it an edge-sparse artifact directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); recompile the artifact") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: unsupported manifest schema {data.get('schema_version') if isinstance(data, dict) else '?'}"
                        f" (this edge-sparse reads {SCHEMA_VERSION}); recompile with this version")
    problem = _manifest_problem(data)
    if problem:
        raise UserError(f"{path} is malformed: {problem}; recompile the artifact")
    return data


_DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}


def _inside(rel: Any) -> bool:
    """A plain relative POSIX path that stays inside the artifact directory."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _manifest_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure (None: nothing). Every reader relies on these fields."""
    for key, kind in (("tool", dict), ("tvm", dict), ("target", dict), ("library", str), ("inputs", list),
                      ("outputs", list), ("files", dict)):
        if key not in data:
            return f"it lacks '{key}'"
        if not isinstance(data[key], kind):
            return f"'{key}' must be a JSON {'object' if kind is dict else 'string' if kind is str else 'list'}"
    for key in ("name", "family"):
        if not isinstance(data["target"].get(key), str):
            return f"'target' lacks a string '{key}'"
    for kind in ("inputs", "outputs"):
        for i, spec in enumerate(data[kind]):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                return f"{kind}[{i}] must be an object with a string 'name'"
            shape = spec.get("shape")
            # (an output may be empty: a Slice starting past the end gives [20, 0, 5])
            lowest = 1 if kind == "inputs" else -1
            if not isinstance(shape, list) or len(shape) > 32 or \
                    not all(type(d) is int and lowest <= d < 2 ** 31 for d in shape):
                return f"{kind}[{i}] ('{spec['name']}') has an invalid shape {str(shape)[:60]}"
            if spec.get("dtype") not in _DTYPES:
                return f"{kind}[{i}] ('{spec['name']}') has an unknown dtype {str(spec.get('dtype'))[:30]!r}"
            rng = spec.get("range")
            if rng is not None and not (isinstance(rng, list) and len(rng) == 2 and all(type(v) is int for v in rng)
                                        and rng[0] <= rng[1]):
                return f"inputs[{i}] ('{spec['name']}') has an invalid range {str(rng)[:60]}"
    for rel, meta in data["files"].items():
        if not _inside(rel):
            return f"'files' names a path outside the artifact: {rel[:80]!r}"
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or len(meta["sha256"]) != 64 \
                or type(meta.get("bytes")) is not int or meta["bytes"] < 0:
            return f"files['{rel[:80]}'] needs a 64-digit 'sha256' and a byte count 'bytes'"
    if not _inside(data["library"]):
        return f"'library' must be a file inside the artifact, got {data['library'][:80]!r}"
    if data["library"] not in data["files"]:
        return f"'library' {data['library'][:80]!r} is not among the hashed 'files'"
    return None


def library_path(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """The artifact's library, hash-verified with every other file of the manifest: the only path to load or upload."""
    verify_files(root, manifest)
    return Path(root).resolve() / manifest["library"]


def verify_files(root: str | os.PathLike, manifest: dict[str, Any], only: list[str] | None = None) -> None:
    """Check sha256 and size of the manifest's files (all, or ``only``) before anything is loaded."""
    root = Path(root).resolve()
    for rel, meta in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        p = (root / rel).resolve()
        if root not in p.parents:
            raise UserError(f"manifest lists a file outside the artifact: {rel}")
        if not p.is_file():
            raise UserError(f"artifact file missing: {p}; copy the whole artifact directory")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise UserError(f"artifact file {rel} does not match its sha256 in {MANIFEST} (modified or corrupt); recompile or re-copy it")


def is_artifact(path: Path) -> bool:
    """What ``compile --force`` may replace: a directory holding an artifact's manifest."""
    return (Path(path) / MANIFEST).is_file()
