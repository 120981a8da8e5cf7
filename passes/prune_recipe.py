"""Pruning recipes: TOML files that set defaults, per-layer sparsity/pattern by name glob, and skips.

```toml
method = "magnitude"        # defaults for flags not given on the command line (see prune --help)
pattern = "16x1"
sparsity = 0.8
allocate = "sensitivity"    # or "uniform"
default_skips = true        # false: also prune the first conv and the classifier head
skip = ["*attention.self.query*"]       # globs on initializer or node names

[[layer]]                   # later rules win over earlier ones
match = "encoder.layer.0.*"             # a glob or a list of globs on initializer or node names
sparsity = 0.5              # fixed for these layers (global allocation does not move it)
pattern = "2:4"
# skip = true               # same as listing the glob in `skip`
```

A ``[[layer]]`` rule that matches a default-skipped layer prunes it. Every glob must match at least one prunable
layer, so a typo fails loudly instead of silently pruning everything uniformly.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from pathlib import Path

from edge_sparse.errors import UserError
from edge_sparse.passes.prune import PrunableLayer
from edge_sparse.passes.prune_masks import Pattern, parse_pattern

__all__ = ["Recipe", "LayerRule", "load_recipe", "resolve", "LayerSetting"]

_TOP_KEYS = {"method", "pattern", "sparsity", "allocate", "default_skips", "skip", "layer"}
_RULE_KEYS = {"match", "sparsity", "pattern", "skip"}


@dataclasses.dataclass
class LayerRule:
    match: list[str]
    sparsity: float | None = None
    pattern: Pattern | None = None
    skip: bool = False


@dataclasses.dataclass
class Recipe:
    method: str | None = None
    pattern: Pattern | None = None
    sparsity: float | None = None
    allocate: str | None = None
    default_skips: bool = True
    skip: list[str] = dataclasses.field(default_factory=list)
    rules: list[LayerRule] = dataclasses.field(default_factory=list)
    source: str = "recipe"


@dataclasses.dataclass
class LayerSetting:
    """Resolved for one layer: skipped (with why), or a pattern and a fixed sparsity (None: the global target)."""

    skip: str | None = None
    pattern: Pattern | None = None
    sparsity: float | None = None


def check_sparsity(value, where: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: sparsity must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= s < 1.0:
        raise UserError(f"{where}: sparsity must be in [0, 1) (fraction of weights set to zero), got {s:g}")
    return s


def _globs(value, where: str) -> list[str]:
    globs = [value] if isinstance(value, str) else value
    if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
        raise UserError(f"{where}: expected a glob string or a list of them, got {value!r}")
    return globs


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path.name} is not valid TOML: {e}") from None
    src = path.name
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(f"recipe {src}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    recipe = Recipe(source=src)
    if "method" in data:
        recipe.method = str(data["method"])
    if "pattern" in data:
        recipe.pattern = parse_pattern(data["pattern"])
    if "sparsity" in data:
        recipe.sparsity = check_sparsity(data["sparsity"], f"recipe {src}")
    if "allocate" in data:
        recipe.allocate = str(data["allocate"])
    if "default_skips" in data:
        if not isinstance(data["default_skips"], bool):
            raise UserError(f"recipe {src}: default_skips must be true or false")
        recipe.default_skips = data["default_skips"]
    if "skip" in data:
        recipe.skip = _globs(data["skip"], f"recipe {src}: skip")
    rules = data.get("layer", [])
    if not isinstance(rules, list):
        raise UserError(f"recipe {src}: use [[layer]] tables for per-layer rules")
    for i, rule in enumerate(rules, 1):
        where = f"recipe {src}: [[layer]] #{i}"
        if not isinstance(rule, dict):
            raise UserError(f"{where} is {type(rule).__name__} {str(rule)[:40]}; write per-layer rules as [[layer]] "
                            f"tables with match = \"GLOB\"")
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_RULE_KEYS))}")
        if "match" not in rule:
            raise UserError(f"{where}: needs match = \"GLOB\" (initializer or node name)")
        recipe.rules.append(LayerRule(
            match=_globs(rule["match"], where),
            sparsity=check_sparsity(rule["sparsity"], where) if "sparsity" in rule else None,
            pattern=parse_pattern(rule["pattern"]) if "pattern" in rule else None,
            skip=bool(rule.get("skip", False)),
        ))
    return recipe


def _matches(layer: PrunableLayer, glob: str) -> bool:
    return fnmatch.fnmatchcase(layer.name, glob) or fnmatch.fnmatchcase(layer.node, glob)


def _matched(layers: list[PrunableLayer], glob: str, where: str) -> list[PrunableLayer]:
    hit = [layer for layer in layers if _matches(layer, glob)]
    if not hit:
        names = ", ".join(layer.name for layer in layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise UserError(f"{where} '{glob}' matches no prunable layer; prunable layers are named like: {names} "
                        f"(see 'edge-sparse analyze')")
    return hit


def resolve(layers: list[PrunableLayer], recipe: Recipe | None, default_skips: dict[str, str],
            use_default_skips: bool, extra_skips: list[str]) -> dict[str, LayerSetting]:
    """One :class:`LayerSetting` per layer name, applying default skips, skip globs and rules in order."""
    recipe = recipe or Recipe()
    settings = {layer.name: LayerSetting() for layer in layers}
    if use_default_skips and recipe.default_skips:
        for name, why in default_skips.items():
            settings[name].skip = why
    for glob in recipe.skip:
        for layer in _matched(layers, glob, f"recipe {recipe.source}: skip glob"):
            settings[layer.name].skip = f"skipped by recipe ({glob})"
    for i, rule in enumerate(recipe.rules, 1):
        for glob in rule.match:
            for layer in _matched(layers, glob, f"recipe {recipe.source}: [[layer]] #{i} match"):
                s = settings[layer.name]
                if rule.skip:
                    s.skip = f"skipped by recipe ({glob})"
                    continue
                s.skip = None
                if rule.pattern is not None:
                    s.pattern = rule.pattern
                if rule.sparsity is not None:
                    s.sparsity = rule.sparsity
    for glob in extra_skips:
        for layer in _matched(layers, glob, "--skip"):
            settings[layer.name].skip = f"skipped by --skip ({glob})"
    return settings
