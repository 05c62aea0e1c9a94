"""The two models trained across sites: ridge brain-age regression and logistic diagnosis.

Both are linear in the regional features after a **public** scaling: every feature is clamped
to its public bounds ``[lo, hi]`` and mapped onto [-1, 1], ``x_s = (x − c) / s`` with
``c = (lo + hi) / 2`` and ``s = (hi − lo) / 2`` (the map of the release contract,
:mod:`fednipype.contract.scaling`); the brain-age label is mapped the same way with its own
public bounds. No mean or standard deviation of the data is ever used, so the scaling discloses
nothing and is the same at every site. Centring on the bounds' midpoint matters for training:
regional volumes share a large common level, and on [0, 1] that level makes the intercept and
the coefficients' sum a direction ~2000 times stiffer than the age signal, which plain
gradient descent then needs thousands of steps to resolve; on [-1, 1] (bounds around the
typical volume) the two are of the same order. The parameter vector ``w`` (length d + 1) is
``[intercept, coef_1..coef_d]`` in scaled units.

- ``"brain-age"``: loss = mean over rows of (x_s·w − y_s)² / 2 + l2/2 ‖coef‖².
- ``"diagnosis"``: loss = mean log-loss of patient (1) vs control (0) + l2/2 ‖coef‖².

The intercept is never penalised. :func:`to_sklearn` folds the scaling into ordinary
scikit-learn coefficients in original units, so a trained model is a plain
:class:`~sklearn.linear_model.Ridge` or :class:`~sklearn.linear_model.LogisticRegression`.

Examples
--------
>>> import numpy as np
>>> s = FeatureScaling(np.array([0.0, 0.0]), np.array([10.0, 20.0]), label=(20.0, 80.0))
>>> s.transform([[5.0, 30.0]]).tolist()           # the second value is clamped to 20
[[0.0, 1.0]]
>>> s.label_inverse(s.label_transform([50.0])).tolist()
[50.0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression, Ridge

from fednipype.exceptions import DataError

__all__ = [
    "TASKS",
    "FeatureScaling",
    "check_task",
    "gradient",
    "gradient_steps",
    "initial_parameters",
    "loss",
    "metrics",
    "penalty_gradient",
    "per_example_gradients",
    "predict_scaled",
    "to_sklearn",
]

#: The tasks a training request may name.
TASKS = ("brain-age", "diagnosis")


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise :class:`DataError`."""
    if task not in TASKS:
        raise DataError(f"task: expected one of {list(TASKS)}, got {task!r}")
    return task


_HINT = "; leave such participants out before training"


def _finite_matrix(values: Any, field: str, columns: int | None = None) -> np.ndarray:
    """``values`` as a finite 2-D float array (``columns`` wide if given), or DataError."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{field}: expected numbers, got non-numeric values ({exc})") from None
    if array.ndim != 2:
        raise DataError(f"{field}: expected a 2-D table (rows × features), got {array.ndim}-D")
    if columns is not None and array.shape[1] != columns:
        raise DataError(f"{field}: expected {columns} feature columns, got {array.shape[1]}")
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{field}: {int(bad.sum())} missing or non-finite values (first at row {row}, "
            f"column {col})" + (_HINT if field == "features" else "")
        )
    return array


def _finite_vector(values: Any, field: str, rows: int | None = None) -> np.ndarray:
    """``values`` as a finite 1-D float array (``rows`` long if given), or DataError."""
    try:
        array = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{field}: expected numbers, got non-numeric values ({exc})") from None
    if rows is not None and array.size != rows:
        raise DataError(f"{field}: expected {rows} values (one per row), got {array.size}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(
            f"{field}: {int(bad.sum())} missing or non-finite values (first at row "
            f"{int(np.argmax(bad))})" + (_HINT if field in ("features", "labels") else "")
        )
    return array


@dataclass(frozen=True)
class FeatureScaling:
    """Public bounds of the features (and of the brain-age label) and their affine maps.

    Parameters
    ----------
    lo, hi : ndarray
        Public lower and upper bound of each feature, ``hi > lo``.
    label : tuple of float or None
        Public ``(lo, hi)`` of the label (brain-age: age in years); None for diagnosis.
    """

    lo: np.ndarray
    hi: np.ndarray
    label: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        lo = np.asarray(self.lo, dtype=float).reshape(-1)
        hi = np.asarray(self.hi, dtype=float).reshape(-1)
        if lo.shape != hi.shape or lo.size == 0:
            raise DataError(
                f"bounds: expected as many lower as upper bounds (at least one), got "
                f"{lo.size} and {hi.size}"
            )
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
            raise DataError("bounds: expected finite bounds with hi > lo for every feature")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        if self.label is not None:
            label_lo, label_hi = (float(v) for v in self.label)
            if not (math.isfinite(label_lo) and math.isfinite(label_hi) and label_hi > label_lo):
                raise DataError(
                    f"bounds/label: expected finite (lo, hi) with hi > lo, got {self.label!r}"
                )
            object.__setattr__(self, "label", (label_lo, label_hi))

    @property
    def center(self) -> np.ndarray:
        """Midpoints ``(lo + hi) / 2`` of the feature bounds."""
        return (self.lo + self.hi) / 2

    @property
    def half_width(self) -> np.ndarray:
        """Half-widths ``(hi − lo) / 2`` of the feature bounds."""
        return (self.hi - self.lo) / 2

    @property
    def n_features(self) -> int:
        """Number of features d."""
        return int(self.lo.size)

    def transform(self, X: Any) -> np.ndarray:
        """Clamp ``X`` (rows × d) to the bounds and map it onto [-1, 1]."""
        X = _finite_matrix(X, "features", self.n_features)
        return (np.clip(X, self.lo, self.hi) - self.center) / self.half_width

    def _label(self) -> tuple[float, float]:
        if self.label is None:
            raise DataError("bounds/label: this scaling has no label bounds (diagnosis task)")
        return self.label

    def label_transform(self, y: Any) -> np.ndarray:
        """Clamp ages to the label bounds and map them onto [-1, 1]."""
        lo, hi = self._label()
        y = _finite_vector(y, "labels")
        return (np.clip(y, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)

    def label_inverse(self, y_s: Any) -> np.ndarray:
        """Map scaled labels back to years (no clamping)."""
        lo, hi = self._label()
        return (lo + hi) / 2 + (hi - lo) / 2 * np.asarray(y_s, dtype=float)


def initial_parameters(n_features: int) -> np.ndarray:
    """The starting point of training: all zeros (length ``n_features + 1``)."""
    return np.zeros(int(n_features) + 1)


def _design(w: Any, Xs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked parameters and the scaled design with its leading column of ones."""
    w = _finite_vector(w, "parameters")
    Xs = _finite_matrix(Xs, "features", w.size - 1)
    return w, np.hstack([np.ones((Xs.shape[0], 1)), Xs])


def _labels(task: str, y: Any, rows: int) -> np.ndarray:
    y = _finite_vector(y, "labels", rows)
    if check_task(task) == "diagnosis" and not np.all((y == 0) | (y == 1)):
        raise DataError("labels: expected 0 (control) or 1 (patient) for the diagnosis task")
    return y


def predict_scaled(task: str, w: Any, Xs: Any) -> np.ndarray:
    """Predictions on scaled features: scaled age (brain-age) or P(patient) (diagnosis)."""
    check_task(task)
    w, design = _design(w, Xs)
    z = design @ w
    return z if task == "brain-age" else special.expit(z)


def penalty_gradient(w: np.ndarray, l2: float) -> np.ndarray:
    """The ridge penalty's gradient ``l2 · w`` with the intercept unpenalised (data-free)."""
    grad = float(l2) * w
    grad[0] = 0.0
    return grad


def loss(task: str, w: Any, Xs: Any, y: Any, l2: float) -> float:
    """Mean loss over rows plus the ridge penalty (l2/2 ‖coef‖², intercept excluded).

    Parameters
    ----------
    task : {"brain-age", "diagnosis"}
    w : ndarray
        ``[intercept, coef...]`` in scaled units.
    Xs : ndarray
        Scaled features (rows × d).
    y : ndarray
        Scaled ages (brain-age) or 0/1 (diagnosis).
    l2 : float
        Ridge penalty.

    Returns
    -------
    float
    """
    check_task(task)
    w, design = _design(w, Xs)
    y = _labels(task, y, design.shape[0])
    z = design @ w
    if task == "brain-age":
        data = 0.5 * np.mean((z - y) ** 2)
    else:
        data = np.mean(np.logaddexp(0.0, z) - y * z)
    return float(data + 0.5 * float(l2) * np.sum(w[1:] ** 2))


def per_example_gradients(task: str, w: Any, Xs: Any, y: Any) -> np.ndarray:
    """Gradient of each row's own loss (no penalty): an (n, d + 1) array.

    For both tasks the gradient of row i is ``(prediction_i − y_i) · [1, x_i]``.
    """
    check_task(task)
    w, design = _design(w, Xs)
    y = _labels(task, y, design.shape[0])
    z = design @ w
    residual = (z if task == "brain-age" else special.expit(z)) - y
    return residual[:, None] * design


def gradient(task: str, w: Any, Xs: Any, y: Any, l2: float) -> np.ndarray:
    """Gradient of :func:`loss` with respect to ``w``."""
    per_row = per_example_gradients(task, w, Xs, y)
    if per_row.shape[0] == 0:
        raise DataError("features: expected at least one row to compute a gradient")
    return per_row.mean(axis=0) + penalty_gradient(np.asarray(w, dtype=float), l2)


def gradient_steps(
    task: str,
    w: Any,
    Xs: Any,
    y: Any,
    *,
    learning_rate: float,
    steps: int,
    l2: float,
    batch_size: int | None = None,
) -> np.ndarray:
    """``steps`` plain gradient-descent steps on :func:`loss` from ``w`` (inputs checked once).

    Full batch when ``batch_size`` is None; otherwise consecutive mini-batches of
    ``batch_size`` rows in the given order, wrapping around (deterministic, no randomness).
    """
    check_task(task)
    w, design = _design(w, Xs)
    y = _labels(task, y, design.shape[0])
    n = design.shape[0]
    if n == 0:
        raise DataError("features: expected at least one row to compute a gradient")
    if batch_size is not None and int(batch_size) < 1:
        raise DataError(f"batch_size: expected a whole number >= 1, got {batch_size!r}")
    w = w.copy()
    start = 0
    for _ in range(int(steps)):
        if batch_size is None or batch_size >= n:
            rows_d, rows_y = design, y
        else:
            rows = np.arange(start, start + int(batch_size)) % n
            start = (start + int(batch_size)) % n
            rows_d, rows_y = design[rows], y[rows]
        z = rows_d @ w
        residual = (z if task == "brain-age" else special.expit(z)) - rows_y
        grad = rows_d.T @ residual / rows_d.shape[0] + penalty_gradient(w, l2)
        w -= float(learning_rate) * grad
    if not np.all(np.isfinite(w)):
        raise DataError(
            f"learning_rate: gradient descent diverged at learning rate {learning_rate!r}; "
            "expected a smaller step"
        )
    return w


def to_sklearn(
    task: str, w: Any, scaling: FeatureScaling, feature_names: Sequence[str]
) -> Ridge | LogisticRegression:
    """An ordinary scikit-learn estimator with the scaling folded into its coefficients.

    ``w0 + Σ b_j (x_j − c_j) / s_j`` equals ``(w0 − Σ b_j c_j / s_j) + Σ (b_j / s_j) x_j``;
    for brain-age the label map ``age = c_y + s_y · y_s`` is folded in as well, so
    ``predict`` returns years. Clamping to the bounds is part of training, not of the folded
    predictor: a value outside its bounds is extrapolated linearly. The estimator's
    hyperparameters are scikit-learn's defaults (it was not fitted by scikit-learn; refitting
    it would not reproduce ``w``).

    Parameters
    ----------
    task : {"brain-age", "diagnosis"}
    w : ndarray
        ``[intercept, coef...]`` in scaled units.
    scaling : FeatureScaling
        The public scaling used in training.
    feature_names : sequence of str
        The feature (region) names, in the order of ``w``.

    Returns
    -------
    sklearn.linear_model.Ridge or sklearn.linear_model.LogisticRegression
        ``coef_``, ``intercept_``, ``n_features_in_``, ``feature_names_in_`` set (and
        ``classes_ = [0, 1]`` for diagnosis).
    """
    check_task(task)
    w = _finite_vector(w, "parameters", scaling.n_features + 1)
    names = [str(n) for n in feature_names]
    if len(names) != scaling.n_features or len(set(names)) != len(names):
        raise DataError(
            f"feature_names: expected {scaling.n_features} distinct names, got {len(names)}"
        )
    coef = w[1:] / scaling.half_width
    intercept = w[0] - float(np.sum(coef * scaling.center))
    estimator: Ridge | LogisticRegression
    if task == "brain-age":
        label_lo, label_hi = scaling._label()
        estimator = Ridge()
        center_y, half_y = (label_lo + label_hi) / 2, (label_hi - label_lo) / 2
        estimator.coef_ = half_y * coef
        estimator.intercept_ = float(center_y + half_y * intercept)
    else:
        estimator = LogisticRegression()
        estimator.coef_ = coef.reshape(1, -1)
        estimator.intercept_ = np.array([intercept])
        estimator.classes_ = np.array([0, 1])
        estimator.n_iter_ = np.array([0], dtype=np.int32)
    estimator.n_features_in_ = len(names)
    estimator.feature_names_in_ = np.array(names, dtype=object)
    return estimator


def metrics(task: str, y_true: Any, prediction: Any) -> dict[str, float | None]:
    """Held-out metrics with scikit-learn's functions.

    Parameters
    ----------
    task : {"brain-age", "diagnosis"}
    y_true : ndarray
        Ages (brain-age; any units, the same as ``prediction``) or 0/1 (diagnosis).
    prediction : ndarray
        Predicted ages, or predicted probabilities of patient.

    Returns
    -------
    dict
        brain-age: ``r2``, ``mae`` and ``loss`` (half the mean squared error), all in the
        units given (``r2`` is None for fewer than two rows or a constant label);
        diagnosis: ``auc``, ``balanced_accuracy`` (threshold 0.5) and ``loss`` (log-loss);
        ``auc`` and ``balanced_accuracy`` are None when one class is absent.
    """
    check_task(task)
    y_true = _finite_vector(y_true, "labels")
    prediction = _finite_vector(prediction, "predictions", y_true.size)
    if y_true.size == 0:
        raise DataError("labels: expected at least one row to evaluate")
    if task == "brain-age":
        defined = y_true.size >= 2 and np.ptp(y_true) > 0
        return {
            "r2": float(skm.r2_score(y_true, prediction)) if defined else None,
            "mae": float(skm.mean_absolute_error(y_true, prediction)),
            "loss": float(0.5 * skm.mean_squared_error(y_true, prediction)),
        }
    y_true = _labels(task, y_true, y_true.size)
    if not np.all((prediction >= 0) & (prediction <= 1)):
        raise DataError("predictions: expected probabilities in [0, 1] for the diagnosis task")
    both = bool(np.any(y_true == 0) and np.any(y_true == 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_loss = float(skm.log_loss(y_true, prediction, labels=[0, 1]))
    return {
        "auc": float(skm.roc_auc_score(y_true, prediction)) if both else None,
        "balanced_accuracy": (
            float(skm.balanced_accuracy_score(y_true, (prediction >= 0.5).astype(float)))
            if both
            else None
        ),
        "loss": log_loss,
    }
