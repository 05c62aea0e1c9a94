"""Non-DP FedAvg on the three bundled sites' own regional features (extracted from their
grey-matter maps), against scikit-learn's pooled and site-only fits on the same rows.

Brain-age trains with one local step per round: the three sites are small (24-44 people) and
their age ranges barely overlap, so several local steps leave a client-drift gap (measured
with 5 local steps: held-out R² 0.9605 against the pooled 0.9652, a 0.5-1.2 % shortfall
depending on the split). Diagnosis: the planted patient effect is large, so held-out AUCs
reach 1.0 for every model; where the site-only models also reach 1.0, "beats the site-only
models" is checked on the held-out log-loss instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import BUNDLED, SITES
from test_learn_fedavg import held_out_metric, scaling_for

from fednipype.learn import fedavg, models, synthetic

L2 = 1e-3
SETTINGS = {
    "brain-age": {"rounds": 2000, "local_steps": 1, "learning_rate": 0.3},
    "diagnosis": {"rounds": 400, "local_steps": 5, "learning_rate": 0.3},
}


def site_table(site: str, features: list[Path], regions: list[str]) -> pd.DataFrame:
    """First session of each participant with age and group in participants.tsv."""
    rows = []
    for path in features:
        parts = dict(p.split("-", 1) for p in path.name.split("_") if "-" in p)
        volumes = pd.read_csv(path, sep="\t").set_index("name")["volume_mm3"]
        rows.append(
            {
                "participant_id": f"sub-{parts['sub']}",
                "ses": parts.get("ses", ""),
                **volumes[regions].to_dict(),
            }  # fmt: skip
        )
    frame = pd.DataFrame(rows).sort_values(["participant_id", "ses"])
    frame = frame.groupby("participant_id", sort=True).head(1)
    people = pd.read_csv(BUNDLED / site / "participants.tsv", sep="\t", na_values=["n/a"])
    frame = frame.merge(people, on="participant_id").dropna(subset=["age", "group"])
    return frame.assign(site=site)


def sklearn_fit(task, scaling, X, y):
    from sklearn.linear_model import LogisticRegression, Ridge  # noqa: PLC0415

    Xs, n = scaling.transform(X), len(y)
    if task == "brain-age":
        fit = Ridge(alpha=n * L2).fit(Xs, scaling.label_transform(y))
    else:
        fit = LogisticRegression(C=1 / (n * L2), max_iter=10_000, tol=1e-10).fit(Xs, y)
    return np.r_[np.ravel(fit.intercept_), np.ravel(fit.coef_)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task", models.TASKS)
def test_non_dp_fedavg_on_the_bundled_sites(task, bundled_features):
    regions = synthetic.regions()
    sites = [
        fedavg.site_data(site_table(s, bundled_features[s], regions), task, regions) for s in SITES
    ]
    assert [s.n for s in sites] == [24, 30, 44]  # siteC's participant without age is left out
    train, held = zip(*[s.split(0.3, "bundled-sites") for s in sites], strict=True)
    scaling = scaling_for(task, len(regions))
    result = fedavg.run_fedavg(train, task, scaling, l2=L2, **SETTINGS[task])
    federated = held_out_metric(task, scaling, result.w, held)
    pooled_w = sklearn_fit(
        task, scaling, np.vstack([s.X for s in train]), np.concatenate([s.y for s in train])
    )
    pooled = held_out_metric(task, scaling, pooled_w, held)
    site_ws = [sklearn_fit(task, scaling, s.X, s.y) for s in train]
    site_only = np.mean([held_out_metric(task, scaling, w, held) for w in site_ws])
    print(f"{task}: federated {federated:.4f}, pooled {pooled:.4f}, site-only {site_only:.4f}")
    assert federated >= 0.99 * pooled
    if task == "diagnosis" and site_only == 1.0:
        loss = np.mean([held_out_metric(task, scaling, w, held, "loss") for w in site_ws])
        federated_loss = held_out_metric(task, scaling, result.w, held, "loss")
        print(f"{task}: held-out log-loss federated {federated_loss:.4f}, site-only {loss:.4f}")
        assert federated == 1.0 and federated_loss < loss
    else:
        assert federated > site_only
