"""The ε–utility curve of federated training on the synthetic federation.

Run from the repository root (about 3.5 minutes of CPU with the defaults; the OpenDP
Gaussian sampler, about 0.13 ms per noise value, is most of it)::

    python bench/training_utility.py                      # table + training_utility.png
    python bench/training_utility.py --repeats 5 --plot out.png --regions 32

Ten synthetic sites (200–500 participants each, subject noise 10 % of each region's
baseline), 20 % of each site held out by the SHA-256 split. For brain-age (held-out R² and
MAE) and diagnosis (held-out AUC) it prints and plots:

- DP FedAvg at ε = 1, 4, 8 per site (δ = 1e-5; σ and σ_count from
  ``fednipype.learn.accountant.calibrate_noise_multiplier``; DP-SGD with OpenDP noise at every
  site), mean ± SD over ``--repeats`` runs;
- non-DP FedAvg (the in-process reference loop);
- the pooled scikit-learn model (all training rows in one place, same public scaling);
- the average site-only scikit-learn model (each site alone, evaluated on all held-out rows);
- the trivial predictor (training mean age; AUC 0.5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402

from fednipype.learn import accountant, fedavg, models, synthetic  # noqa: E402
from fednipype.site import dpsgd  # noqa: E402

EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-5
L2 = 1e-3
NOISE = 0.10
NON_DP = {
    "brain-age": {"rounds": 400, "local_steps": 5, "learning_rate": 0.2},
    "diagnosis": {"rounds": 100, "local_steps": 20, "learning_rate": 0.5},
}
DP = {"rounds": 20, "local_steps": 5, "sampling_rate": 0.2, "clip": 1.0}
DP_LEARNING_RATE = {"brain-age": 0.2, "diagnosis": 0.5}


def scaling_for(task: str, d: int) -> models.FeatureScaling:
    lo, hi = synthetic.REGION_BOUNDS
    label = synthetic.LABEL_BOUNDS if task == "brain-age" else None
    return models.FeatureScaling(np.full(d, lo), np.full(d, hi), label)


def evaluate(task, scaling, w, held) -> dict:
    X = scaling.transform(np.vstack([s.X for s in held]))
    y = np.concatenate([s.y for s in held])
    p = models.predict_scaled(task, w, X)
    if task == "brain-age":
        p = scaling.label_inverse(p)
    return models.metrics(task, y, p)


def sklearn_w(task, scaling, X, y) -> np.ndarray:
    Xs, n = scaling.transform(X), len(y)
    if task == "brain-age":
        fit = Ridge(alpha=n * L2).fit(Xs, scaling.label_transform(y))
    else:
        fit = LogisticRegression(C=1 / (n * L2), max_iter=10_000).fit(Xs, y)
    return np.r_[np.ravel(fit.intercept_), np.ravel(fit.coef_)]


def run_task(task: str, regions: list[str], repeats: int) -> dict[str, list[dict]]:
    frames = synthetic.synthetic_federation(noise_fraction=NOISE)
    sites = [fedavg.site_data(f, task, regions) for f in frames]
    train, held = zip(*[s.split(0.2, "training-utility") for s in sites], strict=True)
    scaling = scaling_for(task, len(regions))
    X = np.vstack([s.X for s in train])
    y = np.concatenate([s.y for s in train])
    out: dict[str, list[dict]] = {}
    out["pooled"] = [evaluate(task, scaling, sklearn_w(task, scaling, X, y), held)]
    site_only = [evaluate(task, scaling, sklearn_w(task, scaling, s.X, s.y), held) for s in train]
    out["site-only"] = site_only
    result = fedavg.run_fedavg(train, task, scaling, l2=L2, **NON_DP[task])
    out["non-DP FedAvg"] = [evaluate(task, scaling, result.w, held)]
    if task == "brain-age":
        y_held = np.concatenate([s.y for s in held])
        out["trivial"] = [models.metrics(task, y_held, np.full(y_held.size, y.mean()))]
    steps = DP["rounds"] * DP["local_steps"]
    for eps in EPSILONS:
        sigma, sigma_count = accountant.calibrate_noise_multiplier(
            eps, DELTA, DP["sampling_rate"], steps
        )
        runs = []
        for _ in range(repeats):
            configs = [
                accountant.DPConfig(
                    DP["clip"], sigma, DP["sampling_rate"], dpsgd.noisy_count(s.n, sigma_count)
                )
                for s in train
            ]
            dp_result = fedavg.run_fedavg(
                train, task, scaling, rounds=DP["rounds"], local_steps=DP["local_steps"],
                learning_rate=DP_LEARNING_RATE[task], l2=L2, dp=configs,
                local_update=dpsgd.local_update,
            )  # fmt: skip
            runs.append({**evaluate(task, scaling, dp_result.w, held), "sigma": sigma})
        out[f"DP eps={eps:g}"] = runs
    return out


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="DP runs per epsilon")
    parser.add_argument("--regions", type=int, default=100, help="first N atlas regions")
    parser.add_argument("--plot", type=Path, default=Path("training_utility.png"))
    args = parser.parse_args(argv)
    regions = synthetic.regions()[: args.regions]
    started = time.perf_counter()
    results = {task: run_task(task, regions, args.repeats) for task in models.TASKS}
    metrics = {"brain-age": ("r2", "mae"), "diagnosis": ("auc",)}
    print(f"# synthetic federation: 10 sites, {len(regions)} regions, subject noise {NOISE:.0%}")
    print(
        f"# DP: {DP['rounds']} rounds x {DP['local_steps']} local steps, q = "
        f"{DP['sampling_rate']}, clip {DP['clip']}, delta {DELTA:g}, {args.repeats} runs each"
    )
    print("| task | model | sigma | " + " | ".join(["metric mean ± SD"] * 2) + " |")
    print("|---|---|---|---|---|")
    for task, rows in results.items():
        for name, runs in rows.items():
            cells = []
            for key in metrics[task]:
                mean, sd = summary(runs, key)
                cells.append(
                    f"{key} {mean:.3f} ± {sd:.3f}" if len(runs) > 1 else f"{key} {mean:.3f}"
                )
            sigma = f"{runs[0]['sigma']:.3f}" if "sigma" in runs[0] else ""
            print(f"| {task} | {name} | {sigma} | " + " | ".join(cells) + " |")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("brain-age", "r2", "held-out R²"), ("brain-age", "mae", "held-out MAE (years)"),
              ("diagnosis", "auc", "held-out AUC")]  # fmt: skip
    for ax, (task, key, label) in zip(axes, panels, strict=True):
        rows = results[task]
        means = [summary(rows[f"DP eps={e:g}"], key) for e in EPSILONS]
        ax.errorbar(EPSILONS, [m for m, _ in means], yerr=[s for _, s in means], marker="o",
                    capsize=3, label="DP FedAvg")  # fmt: skip
        styles = {"non-DP FedAvg": "C1", "pooled": "C2", "site-only": "C3", "trivial": "C7"}
        for name, colour in styles.items():
            if name in rows:
                ax.axhline(summary(rows[name], key)[0], color=colour, ls="--", label=name)
        ax.set_xlabel("ε per site (δ = 1e-5)")
        ax.set_ylabel(label)
        ax.set_xticks(EPSILONS)
        ax.set_title(task)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"# plot: {args.plot}; wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
