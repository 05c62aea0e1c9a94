"""The two linear models: loss and gradients against finite differences and scikit-learn's own
fits, the folded scikit-learn estimators, metrics and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from sklearn.linear_model import LogisticRegression, Ridge

from fednipype.exceptions import DataError
from fednipype.learn import models

NAMES = ["L_P01", "L_P02", "R_P03", "R_P04"]


def problem(task: str, n: int = 60, seed: int = 1):
    """Raw features in mm3 (some outside the bounds), raw labels, the scaling."""
    rng = np.random.default_rng(seed)
    lo, hi = np.array([3000.0, 2000.0, 4000.0, 1000.0]), np.array([9000.0, 8000.0, 9000.0, 5000])
    X = rng.uniform(lo - 300, hi + 300, (n, len(NAMES)))
    if task == "brain-age":
        y = np.clip(20 + 60 * (X[:, 0] - lo[0]) / 6000 + rng.normal(0, 5, n), 18, 90)
        scaling = models.FeatureScaling(lo, hi, label=(18.0, 90.0))
    else:
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(X[:, 1] - 5000) / 800))).astype(float)
        scaling = models.FeatureScaling(lo, hi)
    return X, y, scaling


def scaled_labels(task, y, scaling):
    return scaling.label_transform(y) if task == "brain-age" else y


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", models.TASKS)
def test_gradient_matches_central_finite_differences(task):
    X, y, scaling = problem(task)
    Xs, ys = scaling.transform(X), scaled_labels(task, y, scaling)
    w = np.random.default_rng(2).normal(0, 0.5, Xs.shape[1] + 1)
    l2 = 0.03
    h = 1e-6
    numeric = np.array(
        [
            (models.loss(task, w + h * e, Xs, ys, l2) - models.loss(task, w - h * e, Xs, ys, l2))
            / (2 * h)
            for e in np.eye(w.size)
        ]
    )
    np.testing.assert_allclose(models.gradient(task, w, Xs, ys, l2), numeric, atol=1e-7)
    # each row's gradient against finite differences of that row's own loss (no penalty)
    per_row = models.per_example_gradients(task, w, Xs, ys)
    assert per_row.shape == (Xs.shape[0], w.size)
    for i in (0, 7, 31):
        row_numeric = [
            (
                models.loss(task, w + h * e, Xs[i : i + 1], ys[i : i + 1], 0.0)
                - models.loss(task, w - h * e, Xs[i : i + 1], ys[i : i + 1], 0.0)
            )
            / (2 * h)
            for e in np.eye(w.size)
        ]
        np.testing.assert_allclose(per_row[i], row_numeric, atol=1e-7)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", models.TASKS)
def test_minimiser_of_the_loss_is_scikit_learns_fit_on_scaled_features(task):
    """The loss is scikit-learn's objective: Ridge(alpha=n·l2), LogisticRegression(C=1/(n·l2))."""
    X, y, scaling = problem(task, n=200)
    Xs, ys = scaling.transform(X), scaled_labels(task, y, scaling)
    l2 = 0.01
    fit = optimize.minimize(
        lambda w: models.loss(task, w, Xs, ys, l2),
        np.zeros(Xs.shape[1] + 1),
        jac=lambda w: models.gradient(task, w, Xs, ys, l2),
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000},
    )
    n = Xs.shape[0]
    if task == "brain-age":
        ref = Ridge(alpha=n * l2).fit(Xs, ys)
    else:
        ref = LogisticRegression(C=1 / (n * l2), tol=1e-12, max_iter=10_000).fit(Xs, ys)
    np.testing.assert_allclose(fit.x[0], np.ravel(ref.intercept_)[0], atol=1e-5)
    np.testing.assert_allclose(fit.x[1:], np.ravel(ref.coef_), atol=1e-5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", models.TASKS)
def test_to_sklearn_predicts_as_the_scaled_model(task):
    X, y, scaling = problem(task)
    X_in = np.clip(X, scaling.lo, scaling.hi)  # folding is exact inside the bounds
    w = np.random.default_rng(3).normal(0, 1, X.shape[1] + 1)
    est = models.to_sklearn(task, w, scaling, NAMES)
    frame = pd.DataFrame(X_in, columns=NAMES)
    scaled = models.predict_scaled(task, w, scaling.transform(X_in))
    assert est.n_features_in_ == 4 and list(est.feature_names_in_) == NAMES
    if task == "brain-age":
        assert isinstance(est, Ridge)
        ages = scaling.label_inverse(scaled)
        np.testing.assert_allclose(est.predict(frame), ages, rtol=1e-12, atol=1e-9)
        ss_res = np.sum((y - ages) ** 2)
        expected = 1 - ss_res / np.sum((y - y.mean()) ** 2)
        assert est.score(frame, y) == pytest.approx(expected, rel=1e-10)
    else:
        assert isinstance(est, LogisticRegression)
        proba = est.predict_proba(frame)
        assert proba.shape == (X.shape[0], 2)
        np.testing.assert_allclose(proba[:, 1], scaled, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        np.testing.assert_array_equal(est.predict(frame), (scaled > 0.5).astype(int))
        assert est.score(frame, y) == pytest.approx(np.mean((scaled > 0.5) == y))


@pytest.mark.timeout(30)
def test_metrics_agree_with_independent_formulas():
    rng = np.random.default_rng(4)
    age = rng.uniform(20, 80, 50)
    guess = age + rng.normal(0, 6, 50)
    m = models.metrics("brain-age", age, guess)
    assert m["mae"] == pytest.approx(np.mean(np.abs(age - guess)))
    ss_tot = np.sum((age - age.mean()) ** 2)
    assert m["r2"] == pytest.approx(1 - np.sum((age - guess) ** 2) / ss_tot)
    assert m["loss"] == pytest.approx(0.5 * np.mean((age - guess) ** 2))
    y = (rng.uniform(size=80) < 0.4).astype(float)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 80), 0.01, 0.99)
    m = models.metrics("diagnosis", y, p)
    u = stats.mannwhitneyu(p[y == 1], p[y == 0]).statistic  # AUC = U / (n1 n0)
    assert m["auc"] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
    tpr, tnr = np.mean(p[y == 1] >= 0.5), np.mean(p[y == 0] < 0.5)
    assert m["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2)
    assert m["loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.mark.timeout(30)
def test_single_class_has_no_auc_but_a_loss():
    m = models.metrics("diagnosis", [1, 1, 1], [0.2, 0.6, 0.9])
    assert m["auc"] is None and m["balanced_accuracy"] is None
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.2, 0.6, 0.9])))
    # and a single-class site still has a defined gradient
    X, _, scaling = problem("diagnosis", n=10)
    g = models.gradient("diagnosis", np.zeros(5), scaling.transform(X), np.ones(10), 0.1)
    assert np.all(np.isfinite(g))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", models.TASKS)
def test_nan_features_or_labels_are_a_clear_data_error(task):
    X, y, scaling = problem(task, n=10)
    Xs, ys = scaling.transform(X), scaled_labels(task, y, scaling)
    w = np.zeros(5)
    bad_X = Xs.copy()
    bad_X[3, 2] = np.nan
    with pytest.raises(DataError, match=r"features: 1 missing .*row 3, column 2"):
        models.gradient(task, w, bad_X, ys, 0.1)
    with pytest.raises(DataError, match="features: 1 missing"):
        scaling.transform(np.where(np.isnan(bad_X), np.nan, X))
    bad_y = ys.copy()
    bad_y[5] = np.nan
    with pytest.raises(DataError, match=r"labels: 1 missing .*row 5"):
        models.loss(task, w, Xs, bad_y, 0.1)
    with pytest.raises(DataError, match=r"labels: expected 10 values"):
        models.per_example_gradients(task, w, Xs, ys[:-1])
    with pytest.raises(DataError, match="features: expected 4 feature columns, got 3"):
        models.predict_scaled(task, w, Xs[:, :3])
    with pytest.raises(DataError, match="task: expected one of"):
        models.loss("age", w, Xs, ys, 0.1)


@pytest.mark.timeout(30)
def test_bad_bounds_and_labels_are_refused():
    with pytest.raises(DataError, match="bounds: expected finite bounds with hi > lo"):
        models.FeatureScaling(np.array([1.0]), np.array([1.0]))
    with pytest.raises(DataError, match="bounds/label"):
        models.FeatureScaling(np.array([0.0]), np.array([1.0]), label=(90.0, 18.0))
    with pytest.raises(DataError, match="labels: expected 0 .* or 1"):
        models.loss("diagnosis", np.zeros(2), [[0.5]], [2.0], 0.0)
    with pytest.raises(DataError, match="no label bounds"):
        models.to_sklearn("brain-age", np.zeros(2), models.FeatureScaling([0.0], [1.0]), ["a"])
