"""Relevance-range calibration: the heuristic of paper section II-E for ``[C1, C2]``.

Run the heatmap procedure the ISNet will use on a standard (non-ISNet) classifier over the training
set, keep a running mean M and standard deviation S of the total absolute relevance ``sum |R|`` of
each supervised map (Welford / Chan, nothing stored per image), then
``C1 = max(M / 5, M - 3 S)`` and ``C2 = min(25 C1, M + 3 S)`` -- per supervised map key, e.g.
``"input"``, ``"layer2"``, or per Dual half ``"input/epsilon"``, ``"input/zplus"``.

Pure PyTorch (plus json); the objective layer supplies the heatmap function. Units: relevance
totals are in units of the explained quantity (LRP conserves the logit up to absorption).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = [
    "CalibrationEntry",
    "RelevanceCalibration",
    "WelfordAccumulator",
    "calibrate",
    "relevance_range",
]

Number = TypeVar("Number", float, torch.Tensor)

_FORMAT = "hf_isnet.relevance_calibration"
_VERSION = 1


def relevance_range(mean: Number, std: Number) -> tuple[Number, Number]:
    """Paper eq. (9)-(10): ``C1 = max(M/5, M - 3S)``, ``C2 = min(25*C1, M + 3S)``.

    Args:
        mean: M, mean total absolute relevance (> 0); a number or a tensor (elementwise).
        std: S, its standard deviation (>= 0), same type/shape as ``mean`` (broadcastable).

    Returns:
        ``(c1, c2)`` as floats for number inputs, tensors for tensor inputs; ``0 < c1 <= c2``.
    """
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
        m, s = torch.as_tensor(mean), torch.as_tensor(std)
        if not bool(torch.all(torch.isfinite(m) & torch.isfinite(s) & (m > 0) & (s >= 0))):
            raise ValueError(
                f"relevance_range needs finite mean > 0 and std >= 0, got mean={m.tolist()}, "
                f"std={s.tolist()}; a mean of 0 means every heatmap was zero"
            )
        c1 = torch.maximum(m / 5, m - 3 * s)
        return c1, torch.minimum(25 * c1, m + 3 * s)
    m, s = float(mean), float(std)
    if not (math.isfinite(m) and math.isfinite(s) and m > 0 and s >= 0):
        raise ValueError(
            f"relevance_range needs finite mean > 0 and std >= 0, got mean={m}, std={s}; "
            "a mean of 0 means every heatmap was zero"
        )
    c1 = max(m / 5, m - 3 * s)
    return c1, min(25 * c1, m + 3 * s)


@dataclass(frozen=True)
class CalibrationEntry:
    """Calibration of one supervised map: its range and the statistics it came from.

    Attributes:
        c1, c2: the relevance range ``0 < c1 <= c2`` (total absolute relevance).
        mean, std: M and S of the total absolute relevance (S is the sample std, ddof = 1).
        count: number of heatmaps (images) the statistics cover.
    """

    c1: float
    c2: float
    mean: float
    std: float
    count: int

    def __post_init__(self) -> None:
        if not (0 < self.c1 <= self.c2):
            raise ValueError(f"a calibration entry needs 0 < c1 <= c2, got c1={self.c1}, c2={self.c2}")


@dataclass
class RelevanceCalibration:
    """Per-map relevance ranges ``[C1, C2]`` plus the statistics and metadata behind them.

    ``calibration["input"]`` gives ``(c1, c2)``; ``calibration.entries["input"]`` the full
    :class:`CalibrationEntry`. ``metadata`` is free-form and must be JSON-serialisable (e.g. the
    variant, the backbone, notes). Saved with the run (:meth:`to_json`) so it can be reused.
    """

    entries: dict[str, CalibrationEntry]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> tuple[float, float]:
        """``(c1, c2)`` of map ``key``; KeyError naming the available keys if it is missing."""
        if key not in self.entries:
            raise KeyError(f"no relevance range for {key!r}; calibrated keys: {sorted(self.entries)}")
        entry = self.entries[key]
        return entry.c1, entry.c2

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        """The calibrated map keys, sorted."""
        return sorted(self.entries)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """``{key: (c1, c2)}`` for every calibrated map."""
        return {key: self[key] for key in self.keys()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with a format tag and version, read back by :meth:`from_dict`)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "entries": {
                key: {
                    "c1": e.c1,
                    "c2": e.c2,
                    "mean": e.mean,
                    "std": e.std,
                    "count": e.count,
                }
                for key, e in sorted(self.entries.items())
            },
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelevanceCalibration:
        """Inverse of :meth:`to_dict`; ValueError for another format or a newer version."""
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"not a relevance calibration of format {_FORMAT!r} version {_VERSION}: got "
                f"format={data.get('format')!r}, version={data.get('version')!r}"
            )
        entries = {
            key: CalibrationEntry(
                c1=float(e["c1"]),
                c2=float(e["c2"]),
                mean=float(e["mean"]),
                std=float(e["std"]),
                count=int(e["count"]),
            )
            for key, e in data["entries"].items()
        }
        return cls(entries=entries, metadata=dict(data.get("metadata", {})))

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dict` as indented JSON (floats round-trip exactly)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RelevanceCalibration:
        """Reads a file written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@dataclass
class _Stream:
    """Running statistics of one key: count, mean and sum of squared deviations M2 (float64)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def merge(self, count: int, mean: float, m2: float) -> None:
        # Chan et al.'s pairwise update: exact for any split of the data, and stable because it
        # combines deviations from the means rather than raw sums of squares.
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total


class WelfordAccumulator:
    """Running mean and standard deviation of per-image total relevance, one stream per map key.

    Batched Welford: each :meth:`update` computes the batch's mean and squared deviations in
    float64 (two-pass) and merges them with Chan's parallel formula, so the result equals the
    statistics of the concatenated stream up to float64 rounding and nothing is stored per image.
    :meth:`std` is the unbiased SAMPLE standard deviation (``ddof = 1``, numpy's
    ``std(ddof=1)``, torch's default), the standard output of Welford's algorithm; over a training
    set the difference to the population std is negligible.
    """

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    def update(self, key: str, values: torch.Tensor | Iterable[float]) -> None:
        """Adds a ``[N]`` batch of per-image totals (e.g. ``sum |R|`` per image) to stream ``key``.

        Raises ValueError for a non-1-D input or non-finite values (a diverging heatmap would
        otherwise silently poison the range).
        """
        v = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
        if v.dim() != 1:
            raise ValueError(
                f"update expects a 1-D tensor of per-image totals for {key!r}, got shape {tuple(v.shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"non-finite relevance totals for {key!r}: {v[~torch.isfinite(v)].tolist()[:5]}")
        stream = self._streams.setdefault(key, _Stream())
        if v.numel():
            mean = v.mean()
            stream.merge(v.numel(), mean.item(), ((v - mean) ** 2).sum().item())

    def merge(self, other: WelfordAccumulator) -> None:
        """Adds the streams of ``other`` (e.g. from another process) into this accumulator."""
        for key, s in other._streams.items():
            self._streams.setdefault(key, _Stream()).merge(s.count, s.mean, s.m2)

    def _stream(self, key: str) -> _Stream:
        if key not in self._streams:
            raise KeyError(f"no values accumulated for {key!r}; keys: {self.keys()}")
        return self._streams[key]

    def keys(self) -> list[str]:
        """The keys seen so far, sorted."""
        return sorted(self._streams)

    def count(self, key: str) -> int:
        """Number of values accumulated for ``key``."""
        return self._stream(key).count

    def mean(self, key: str) -> float:
        """Mean of the values of ``key`` (ValueError if there are none)."""
        stream = self._stream(key)
        if stream.count == 0:
            raise ValueError(f"no values accumulated for {key!r}")
        return stream.mean

    def std(self, key: str) -> float:
        """Sample standard deviation (ddof = 1) of ``key``; needs at least 2 values."""
        stream = self._stream(key)
        if stream.count < 2:
            raise ValueError(f"the standard deviation of {key!r} needs at least 2 values, got {stream.count}")
        return math.sqrt(stream.m2 / (stream.count - 1))

    def result(self, **metadata: Any) -> RelevanceCalibration:
        """The :class:`RelevanceCalibration` of every key (``relevance_range`` of its M and S)."""
        if not self._streams:
            raise ValueError("no values accumulated: nothing to calibrate")
        entries = {}
        for key in self.keys():
            mean, std = self.mean(key), self.std(key)
            c1, c2 = relevance_range(mean, std)
            entries[key] = CalibrationEntry(c1=c1, c2=c2, mean=mean, std=std, count=self.count(key))
        return RelevanceCalibration(entries=entries, metadata=metadata)


def _per_image_total(key: str, heatmap: torch.Tensor) -> torch.Tensor:
    """``sum |R|`` over everything but the batch dimension: ``[B, ...]`` -> ``[B]``."""
    if not isinstance(heatmap, torch.Tensor) or heatmap.dim() < 2:
        raise ValueError(
            f"heatmap_fn must return tensors of shape [B, ...] per key; {key!r} is "
            f"{tuple(heatmap.shape) if isinstance(heatmap, torch.Tensor) else type(heatmap).__name__}"
        )
    heatmap = heatmap.detach()
    if heatmap.dtype in (torch.float16, torch.bfloat16):  # half-precision sums overflow
        heatmap = heatmap.float()
    return heatmap.abs().flatten(1).sum(dim=1)


def calibrate(
    heatmap_fn: Callable[[Any], Mapping[str, torch.Tensor]],
    dataloader: Iterable[Any],
    max_batches: int | None = None,
    progress: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> RelevanceCalibration:
    """Runs the calibration pass over ``dataloader`` and returns the relevance ranges.

    For each batch, ``heatmap_fn(batch)`` returns ``{key: heatmap}`` with heatmaps of shape
    ``[B, ...]`` (one per image, e.g. ``[B, C, H, W]`` at the input, or one Dual half); the total
    absolute relevance of each image is accumulated per key. ``heatmap_fn`` owns the model, device
    and gradient mode: LRP heatmaps need autograd, so calibrate does not enter ``torch.no_grad``.

    Args:
        heatmap_fn: batch -> ``{key: [B, ...] tensor}``; every batch must give the same keys.
        dataloader: any iterable of batches (a DataLoader, a list, ...).
        max_batches: stop after this many batches (None: the whole iterable).
        progress: show a tqdm progress bar.
        metadata: stored in the result's ``metadata``.

    Returns:
        :class:`RelevanceCalibration` with one entry per key.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches}")
    # islice rather than a break inside the loop: a DataLoader would otherwise load one batch more.
    batches: Iterable[Any] = itertools.islice(dataloader, max_batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        batches = tqdm(batches, total=total, desc="relevance calibration")
    accumulator = WelfordAccumulator()
    first_keys: list[str] | None = None
    seen = 0
    for batch in batches:
        heatmaps = heatmap_fn(batch)
        keys = sorted(heatmaps)
        if first_keys is None:
            first_keys = keys
        elif keys != first_keys:
            raise ValueError(
                f"heatmap_fn returned keys {keys} for batch {seen} but {first_keys} for batch 0; "
                "it must return the same maps for every batch"
            )
        for key in keys:
            accumulator.update(key, _per_image_total(key, heatmaps[key]))
        seen += 1
    if seen == 0:
        raise ValueError("the dataloader yielded no batches: nothing to calibrate")
    return accumulator.result(**dict(metadata or {}))
