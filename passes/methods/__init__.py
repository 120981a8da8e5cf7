"""Pruning methods, registered by name: how one layer's weight is scored, masked and (for some methods) updated.

A method is one class in one module of this package, decorated with :func:`register`; every module here is imported
on the first lookup, so adding a method is adding a file (and ``--method NAME`` accepts it at once)::

    @register
    class Magnitude(PruningMethod):
        name = "magnitude"
        summary = "|W|, compared across the whole layer"

        def score(self, layer, weight, statistic):
            return np.abs(weight)

What a method declares (class attributes) and what the driver (:func:`edge_sparse.pruning.prune`) does with it:

- ``needs_calibration``: the method cannot run without calibration data; ``prune`` then requires ``--calib``.
- ``statistic(layer)``: a :class:`Statistic` (an accumulator over the calibration activations feeding ``layer``), or
  None. The driver runs the model on the calibration part once, feeds every batch of each layer's input activation
  to ``update`` and hands ``result()`` back to :meth:`PruningMethod.prune`. Layers reading the same tensor share one
  statistic (it is created for the first of them).
- ``updates_weights``: :meth:`PruningMethod.prune` also changes the weights it keeps (e.g. reconstruction by least
  squares against the calibration activations); False means the kept weights stay bit-identical.
- ``per_row``: scores are compared within each output channel (or row of blocks) instead of across the layer.
- ``preference``: when ``--method`` is not given, the method with the highest preference among those whose
  calibration needs are met is the default (with random calibration inputs, not one that ``updates_weights``).

All weights reach a method in the canonical ``[N_out, K_in]`` view of :mod:`edge_sparse.passes.prune_masks` (one row
per output channel, one column per reduction feature; a conv's columns are ``Cin x kh x kw``, channel-major).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_sparse.errors import UserError, closest
from edge_sparse.passes.prune_masks import Pattern, mask

if TYPE_CHECKING:
    from edge_sparse.passes.prune import PrunableLayer

__all__ = ["PruningMethod", "Statistic", "InputNorm", "register", "get", "names", "default", "describe",
           "canonical_feature_norm"]

_REGISTRY: dict[str, type[PruningMethod]] = {}
_LOADED = False


class Statistic:
    """Accumulates one statistic of a layer's input activation over calibration batches.

    ``update`` receives each batch of the activation exactly as onnxruntime returns it (the tensor named
    ``layer.activation``, with its reduction features on ``layer.feature_axis``) and, for a model fed padded
    sequences, the batch's token mask (``[batch, positions]``, nonzero = real token; see
    :func:`edge_sparse.passes.calibrate.token_rows`): rows of padded positions must not count. ``result`` is what
    :meth:`PruningMethod.prune` gets as ``statistic``.
    """

    def update(self, activation: np.ndarray, tokens: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


class InputNorm(Statistic):
    """L2 norm of each input feature (channel) over every sample and (real-token) position: ``||X_k||_2``, float64
    ``[C]``."""

    def __init__(self, feature_axis: int):
        self.axis = feature_axis
        self.sums: np.ndarray | None = None

    def update(self, activation: np.ndarray, tokens: np.ndarray | None = None) -> None:
        from edge_sparse.passes.calibrate import token_rows

        x = np.moveaxis(np.asarray(activation, dtype=np.float64), self.axis, -1)
        x = x.reshape(-1, x.shape[-1])
        rows = token_rows(tokens, activation, self.axis)
        if rows is not None:
            x = x[rows]
        sq = np.square(x).sum(axis=0)
        self.sums = sq if self.sums is None else self.sums + sq

    def result(self) -> np.ndarray:
        if self.sums is None:
            raise ValueError("no calibration batches reached this statistic")
        return np.sqrt(self.sums)


class PruningMethod:
    """Base class of a pruning method; subclasses set the class attributes and override :meth:`score` (mask from
    scores, kept weights unchanged) or :meth:`prune` (anything else, e.g. updating the kept weights)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""                  # one line for --help and reports
    needs_calibration: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False
    per_row: ClassVar[bool] = False
    preference: ClassVar[int] = 0

    def statistic(self, layer: PrunableLayer) -> Statistic | None:
        """A fresh accumulator for ``layer``'s input activation, or None when the method needs no calibration."""
        return None

    def score(self, layer: PrunableLayer, weight: np.ndarray, statistic: Any) -> np.ndarray:
        """Importance of every element of the canonical ``[N, K]`` ``weight`` (higher is kept first)."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither score() nor prune()")

    def saliency(self, layer: PrunableLayer, weight: np.ndarray, norm: np.ndarray | None) -> np.ndarray:
        """Importance of every element of the canonical ``[N, K]`` ``weight`` for choosing the order of its output
        channels before block pruning (:mod:`edge_sparse.passes.permute`). ``norm``: each input feature's L2 norm
        over the calibration data (:class:`InputNorm`), given when :meth:`statistic` is not None. Default:
        ``|W| x norm`` (the activation-aware score) for methods with calibration statistics, :meth:`score`
        otherwise."""
        if norm is None:
            return np.asarray(self.score(layer, weight, None), dtype=np.float64)
        return np.abs(weight.astype(np.float64)) * canonical_feature_norm(layer, np.asarray(norm, np.float64))[None, :]

    def prune(self, layer: PrunableLayer, weight: np.ndarray, pattern: Pattern, sparsity: float,
              statistic: Any = None) -> np.ndarray:
        """The pruned canonical ``[N, K]`` matrix: zeros in ``pattern`` at ``sparsity`` (ignored for N:M), kept
        entries as the method leaves them. ``weight`` must not be modified. The default keeps the highest
        :meth:`score` values and leaves them unchanged."""
        keep = mask(self.score(layer, weight, statistic), pattern, sparsity, per_row=self.per_row)
        return np.where(keep, weight, 0).astype(weight.dtype)

    def __repr__(self) -> str:
        return f"<pruning method {self.name}>"


def canonical_feature_norm(layer: PrunableLayer, norm: np.ndarray) -> np.ndarray:
    """A per-channel input statistic expanded to the canonical columns (a conv repeats each channel kh*kw times)."""
    return np.repeat(norm, layer.repeat) if layer.repeat > 1 else norm


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"pruning method '{cls.name}' is registered twice ({other.__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def names() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_REGISTRY))


def get(method: str | PruningMethod) -> PruningMethod:
    """The method object for a name (UserError naming the known ones otherwise); objects pass through."""
    if isinstance(method, PruningMethod):
        return method
    _load()
    cls = _REGISTRY.get(str(method))
    if cls is None:
        known = names()
        raise UserError(f"unknown method '{method}'{closest(str(method), known)}: use {' or '.join(known)}")
    return cls()


def default(calibrated: bool, real: bool = True, many: bool = False) -> str:
    """Name of the default method: the highest ``preference`` among those usable with/without calibration data.
    ``real=False`` (random calibration inputs): methods that fit the kept weights to the calibration activations
    (``updates_weights``) are not chosen, since fitting random inputs undoes what the weights do on real ones.
    ``many=True`` (a search that prunes many configurations, ``optimize``): the same exclusion, because fitting the
    weights costs minutes per model where a mask-only method costs seconds."""
    _load()
    usable = [c for c in _REGISTRY.values() if (calibrated or not c.needs_calibration)
              and ((real and not many) or not (calibrated and c.updates_weights))]
    return max(usable, key=lambda c: (c.preference, c.name)).name


def describe() -> str:
    """``name (summary)`` for every method, for help texts."""
    return "; ".join(f"{n} ({_REGISTRY[n].summary})" if _REGISTRY[n].summary else n for n in names())
