"""Federated averaging (McMahan et al. 2017) of the linear models, and its in-process reference.

Round r: the hub sends ``w``; each site k returns its new local ``w_k`` (after
``local_steps`` steps from ``w``) and a weight ``m_k`` — its training-row count ``n_k``, or
under DP its released noisy count ``ñ_k``. The hub takes ``w ← Σ m_k w_k / Σ m_k``
(:func:`fedavg`). With one full-batch local step per round this is exactly centralised gradient
descent on the pooled rows; more local steps save rounds at the price of some client drift.

:func:`run_fedavg` runs that loop in one process, without Flower or SecAgg+: it is the
reference the Flower app must reproduce in non-DP mode, and what the utility tests and the
utility benchmark train with. It is given the site's local update as a function, so this module
stays free of the DP noise sampler (``fednipype.site.dpsgd.local_update`` is the one to pass
for DP).

References
----------
McMahan, B. et al. (2017). Communication-efficient learning of deep networks from
decentralized data. AISTATS, PMLR 54, 1273–1282.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fednipype.exceptions import DataError
from fednipype.learn import models
from fednipype.learn.accountant import DPConfig

__all__ = [
    "FedAvgResult",
    "SiteData",
    "fedavg",
    "fedsgd_step",
    "gradient_descent",
    "holdout_split",
    "run_fedavg",
    "site_data",
]

#: ``local_update(task, w, Xs, y, *, learning_rate, local_steps, l2, dp, batch_size)``
LocalUpdate = Callable[..., np.ndarray]


@dataclass(frozen=True)
class SiteData:
    """One site's rows in original units.

    Attributes
    ----------
    site : str
        The site's name.
    X : ndarray
        (n, d) regional features (mm3), in the model's feature order.
    y : ndarray
        Ages in years (brain-age) or 1 = patient / 0 = control (diagnosis).
    participant_ids : tuple of str
        One per row (what :func:`holdout_split` hashes).
    """

    site: str
    X: np.ndarray
    y: np.ndarray
    participant_ids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        X = np.asarray(self.X, dtype=float)
        y = np.asarray(self.y, dtype=float).reshape(-1)
        if X.ndim != 2 or X.shape[0] != y.size:
            raise DataError(
                f"{self.site}: expected features (rows × d) and one label per row, got "
                f"{X.shape} and {y.size} labels"
            )
        ids = tuple(str(i) for i in self.participant_ids) or tuple(
            f"row-{i}" for i in range(y.size)
        )
        if len(ids) != y.size:
            raise DataError(f"{self.site}: expected {y.size} participant ids, got {len(ids)}")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "participant_ids", ids)

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.y.size)

    def subset(self, mask: np.ndarray) -> SiteData:
        """The rows where ``mask`` is True."""
        mask = np.asarray(mask, dtype=bool)
        ids = tuple(i for i, keep in zip(self.participant_ids, mask, strict=True) if keep)
        return SiteData(self.site, self.X[mask], self.y[mask], ids)

    def split(self, fraction: float, key: str) -> tuple[SiteData, SiteData]:
        """(training rows, held-out rows) by :func:`holdout_split`."""
        held = holdout_split(self.participant_ids, fraction, key)
        return self.subset(~held), self.subset(held)


def site_data(frame: pd.DataFrame, task: str, regions: Sequence[str]) -> SiteData:
    """A :class:`SiteData` from a table with ``site``, ``participant_id``, ``age``, ``group``.

    The label is ``age`` (brain-age) or ``group == "patient"`` (diagnosis); the features are
    the ``regions`` columns in that order.
    """
    models.check_task(task)
    missing = [c for c in ("site", "participant_id", *regions) if c not in frame.columns]
    label = "age" if task == "brain-age" else "group"
    if label not in frame.columns:
        missing.append(label)
    if missing:
        raise DataError(f"site table: missing columns {missing}")
    y = frame["age"] if task == "brain-age" else (frame["group"] == "patient").astype(float)
    sites = frame["site"].unique()
    return SiteData(
        str(sites[0]) if len(sites) else "",
        frame[list(regions)].to_numpy(float),
        y.to_numpy(float),
        tuple(frame["participant_id"].astype(str)),
    )


def holdout_split(ids: Sequence[str], fraction: float, key: str) -> np.ndarray:
    """Which participants are held out: a deterministic function of a public key and the id.

    Participant i is held out when the first 8 bytes of ``SHA-256(key + "\\0" + id)``, read
    as an unsigned integer over 2^64, are below ``fraction``. Nothing depends on data values,
    so every site and every rerun of the same request (``key`` = its content hash) agree.

    Parameters
    ----------
    ids : sequence of str
        Participant ids.
    fraction : float
        Expected held-out share, 0 <= fraction < 1.
    key : str
        A public key, e.g. the training request's content hash.

    Returns
    -------
    ndarray of bool
        True for held-out participants.

    Examples
    --------
    >>> holdout_split(["sub-01", "sub-02", "sub-03", "sub-04"], 0.5, "request").tolist()
    [True, False, True, True]
    """
    if not 0 <= float(fraction) < 1:
        raise DataError(f"holdout_fraction: expected 0 <= fraction < 1, got {fraction!r}")
    out = np.zeros(len(ids), dtype=bool)
    for i, pid in enumerate(ids):
        digest = hashlib.sha256(f"{key}\0{pid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64 < float(fraction)
    return out


def gradient_descent(
    task: str,
    w: Any,
    Xs: Any,
    y: Any,
    *,
    learning_rate: float,
    local_steps: int,
    l2: float,
    batch_size: int | None = None,
    dp: None = None,
) -> np.ndarray:
    """Non-private local update: ``local_steps`` gradient steps of :func:`models.loss`.

    See :func:`fednipype.learn.models.gradient_steps` (full batch or cyclic mini-batches).
    ``dp`` exists so this function has the signature of a local update; it must be None.
    """
    if dp is not None:
        raise DataError("dp: the non-private local update takes no DP settings")
    return models.gradient_steps(
        task,
        w,
        Xs,
        y,
        learning_rate=learning_rate,
        steps=local_steps,
        l2=l2,
        batch_size=batch_size,
    )


def fedavg(weighted_sum: Any, total_weight: float) -> np.ndarray:
    """The FedAvg average ``Σ m_k w_k / Σ m_k`` from its numerator and denominator."""
    total = float(total_weight)
    if not total > 0:
        raise DataError(f"weights: expected a positive total weight, got {total_weight!r}")
    return np.asarray(weighted_sum, dtype=float) / total


def fedsgd_step(
    w: Any, gradient_sum: Any, total_weight: float, *, learning_rate: float, l2: float
) -> np.ndarray:
    """One FedSGD step at the hub: ``w - lr (Σ_k g_k / Σ_k m_k + l2 w)`` (intercept unpenalised).

    ``Σ_k g_k`` is the (noisy) sum of every site's clipped per-participant gradients and
    ``Σ_k m_k`` the sum of their weights (noisy counts). It is the FedAvg average of the
    sites' one-step DP-SGD updates with sampling rate 1
    (:func:`fednipype.site.dpsgd.local_update` divides each site's sum by its own count),
    computed from the sums alone: the step of mode ``distributed-dp``.

    >>> fedsgd_step([0.0, 1.0], [2.0, 4.0], 4.0, learning_rate=0.5, l2=0.5).tolist()
    [-0.25, 0.25]
    """
    total = float(total_weight)
    if not total > 0:
        raise DataError(f"weights: expected a positive total weight, got {total_weight!r}")
    w = np.asarray(w, dtype=float)
    penalty = models.penalty_gradient(w, l2)
    return w - float(learning_rate) * (np.asarray(gradient_sum, dtype=float) / total + penalty)


@dataclass(frozen=True)
class FedAvgResult:
    """What :func:`run_fedavg` returns.

    Attributes
    ----------
    w : ndarray
        Final parameters (scaled units).
    history : list of ndarray
        The hub's parameters after each round.
    weights : dict
        Each site's FedAvg weight (row count, or noisy count under DP).
    """

    w: np.ndarray
    history: list[np.ndarray]
    weights: dict[str, float]


def run_fedavg(
    sites: Sequence[SiteData],
    task: str,
    scaling: models.FeatureScaling,
    *,
    rounds: int,
    local_steps: int,
    learning_rate: float,
    l2: float,
    dp: DPConfig | Sequence[DPConfig | None] | None = None,
    local_update: LocalUpdate | None = None,
    batch_size: int | None = None,
    initial: np.ndarray | None = None,
) -> FedAvgResult:
    """Train by FedAvg in one process (the reference loop; no Flower, no SecAgg+).

    Parameters
    ----------
    sites : sequence of SiteData
        The sites' training rows in original units.
    task : {"brain-age", "diagnosis"}
    scaling : FeatureScaling
        The public scaling (features and, for brain-age, the label).
    rounds, local_steps : int
        FedAvg rounds, local steps per round.
    learning_rate, l2 : float
        Step size and ridge penalty.
    dp : DPConfig or sequence of (DPConfig or None) or None
        One config for every site, one per site (None = that site trains without DP), or
        None for no DP anywhere.
    local_update : callable, optional
        The site's update (signature of ``fednipype.site.dpsgd.local_update``); required when
        any site trains with DP, :func:`gradient_descent` otherwise.
    batch_size : int, optional
        Mini-batch size of the non-private update.
    initial : ndarray, optional
        Starting parameters (zeros by default).

    Returns
    -------
    FedAvgResult
    """
    models.check_task(task)
    if not sites:
        raise DataError("sites: expected at least one site")
    configs = list(dp) if isinstance(dp, Sequence) else [dp] * len(sites)
    if len(configs) != len(sites):
        raise DataError(f"dp: expected one setting per site ({len(sites)}), got {len(configs)}")
    if any(c is not None for c in configs) and local_update is None:
        raise DataError(
            "local_update: DP training needs the site's DP update "
            "(fednipype.site.dpsgd.local_update)"
        )
    update = local_update or gradient_descent
    prepared = []
    for site, config in zip(sites, configs, strict=True):
        Xs = scaling.transform(site.X)
        y = scaling.label_transform(site.y) if task == "brain-age" else site.y
        weight = float(site.n) if config is None else float(config.expected_n)
        prepared.append((site.site, Xs, y, config, weight))
    weights = {name: weight for name, _, _, _, weight in prepared}
    w = models.initial_parameters(scaling.n_features) if initial is None else np.array(initial)
    history = []
    for _ in range(int(rounds)):
        total = np.zeros_like(w)
        for _name, Xs, y, config, weight in prepared:
            local = update(
                task,
                w,
                Xs,
                y,
                learning_rate=learning_rate,
                local_steps=local_steps,
                l2=l2,
                dp=config,
                batch_size=batch_size,
            )
            total += weight * local
        w = fedavg(total, sum(weights.values()))
        history.append(w.copy())
    return FedAvgResult(w, history, weights)
