"""A site's answer to a federated request, with the real ledger (SQLite) and OpenDP's samplers:
refusals before any charge, the charge before the answer, the three modes against
independent references (numpy statistics of the raw rows, dp-accounting, a chi-square test)."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path

import dp_accounting
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from support import REQUEST_SITES as SITES
from support import make_request

from fednipype.contract.calibration import analytic_gaussian_sigma
from fednipype.contract.distributed_dp import request_noise
from fednipype.contract.secure_sum import Grid, SumLayout
from fednipype.contract.statistics import SufficientStatistics
from fednipype.exceptions import (
    DisclosureError,
    PolicyError,
    PrivacyBudgetExceeded,
    RequestError,
)
from fednipype.features import FEATURE_COLUMNS
from fednipype.site import approvals
from fednipype.site.answer import answer_request
from fednipype.site.ledger import PrivacyLedger
from fednipype.site.node import answer_node_request, check_request
from fednipype.site.policy import SitePolicy

REGIONS = ("L_P01", "R_P01", "L_P12")
ALL_MODES = '\n[federation]\nmodes = ["dp", "distributed-dp"]\nallow_exact_secure_sum = true\n'


def simulate(n: int, seed: int) -> pd.DataFrame:
    """``n`` participants: age, sex, group and three regional volumes inside the bounds."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n).round(1)
    sex = rng.choice(["F", "M"], n)
    group = rng.choice(["control", "patient"], n)
    rows = pd.DataFrame(
        {
            "participant_id": [f"sub-{i:03d}" for i in range(1, n + 1)],
            "age": age,
            "sex": sex,
            "group": group,
        }
    )
    for j, region in enumerate(REGIONS):
        base = 6000 + 300 * j - 20 * (age - 50) + 150 * (sex == "M") - 200 * (group == "patient")
        rows[region] = np.clip(base + rng.normal(0, 400, n), 2100, 9900).round(2)
    return rows


def write_site(folder: Path, rows: pd.DataFrame) -> tuple[list[Path], Path]:
    """The site's participants.tsv and one regional-features table per participant, in a
    derivative dataset ``folder/derivatives``."""
    derivatives = folder / "derivatives"
    derivatives.mkdir(parents=True, exist_ok=True)
    (derivatives / "dataset_description.json").write_text(
        json.dumps(
            {"Name": "features", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
             "GeneratedBy": [{"Name": "fednipype"}]}
        ),
        encoding="utf-8",
    )  # fmt: skip
    participants = folder / "participants.tsv"
    rows[["participant_id", "age", "sex", "group"]].to_csv(participants, sep="\t", index=False)
    features = []
    for _, row in rows.iterrows():
        table = pd.DataFrame(
            {
                "index": np.arange(1, len(REGIONS) + 1),
                "name": list(REGIONS),
                "voxel_count": [100] * len(REGIONS),
                "nan_count": [0] * len(REGIONS),
                "volume_mm3": [row[r] for r in REGIONS],
                "mean": [0.5] * len(REGIONS),
                "std": [0.1] * len(REGIONS),
            }
        )[list(FEATURE_COLUMNS)]
        anat = derivatives / row["participant_id"] / "anat"
        anat.mkdir(parents=True)
        path = anat / f"{row['participant_id']}_desc-regional_features.tsv"
        table.to_csv(path, sep="\t", index=False)
        features.append(path)
    return features, participants


def raw_vector(request, rows: pd.DataFrame, slot: int) -> np.ndarray:
    """The site's exact vector from its raw rows (numpy), in the request's scaled units."""
    terms = request.terms  # intercept, age, group[patient], sex[M]
    columns = {
        "intercept": np.ones(len(rows)),
        "age": (rows["age"].to_numpy() - 50.0) / 40.0,
        "group[patient]": np.where(rows["group"] == "patient", 1.0, -1.0),
        "sex[M]": np.where(rows["sex"] == "M", 1.0, -1.0),
    }
    z = np.column_stack([columns[t] for t in terms])
    y = (rows[list(REGIONS)].to_numpy() - 6000.0) / 4000.0
    raw = SufficientStatistics(
        terms=terms,
        regions=REGIONS,
        ztz=z.T @ z,
        zty=z.T @ y,
        yty=(y**2).sum(axis=0),
        n=float(len(rows)),
        n_terms=request.n_terms,
    )
    return SumLayout.from_request(request).site_vector(raw, slot)


class Site:
    """One site: its data, policy, ledger."""

    def __init__(self, folder: Path, site_policy, name: str, rows, *, extra="", epsilon=10.0):
        self.name, self.rows = name, rows
        self.policy = site_policy(folder / "policy", dataset=name, epsilon=epsilon, bind=False)
        self.policy.write_text(extra + self.policy.read_text() + ALL_MODES, encoding="utf-8")
        from fednipype.site.lifecycle import init_ledger

        init_ledger(self.policy)
        self.folder = folder / "data"
        self.features, self.participants = write_site(self.folder, rows)

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.from_policy(SitePolicy.from_toml(self.policy))

    def answer(self, request, policy=None):
        return answer_request(
            request,
            policy or self.policy,
            features=self.features,
            participants=self.participants,
            site=self.name,
        )

    def refusal(self, request, kind, policy=None) -> str:
        with pytest.raises(kind) as err:
            self.answer(request, policy)
        return str(err.value)


@pytest.fixture
def site(tmp_path, site_policy) -> Site:
    return Site(tmp_path / "a", site_policy, "siteA", simulate(40, 1))


def _exact_request(**changes):
    return make_request(mode="exact", epsilon=None, delta=None, min_sites=3, **changes)


# -- exact -------------------------------------------------------------------------------------


def test_exact_answer_is_the_site_vector_of_the_raw_statistics(site):
    request = _exact_request()
    approvals.approve(site.ledger, request)
    answer = site.answer(request)
    grid = Grid.for_request(request)
    expected = raw_vector(request, site.rows, 0)
    assert answer.vector.dtype == np.int64 and answer.noise_sd == 0.0
    np.testing.assert_array_equal(answer.vector, grid.encode(expected))
    np.testing.assert_allclose(grid.decode(answer.vector), expected, rtol=0, atol=grid.step / 2)
    assert answer.vector[: SumLayout.from_request(request).slot_size][0] * grid.step == 40
    # A non-DP disclosure: recorded as an event, no charge, the approval used.
    assert site.ledger.audit_trail() == []
    kinds = [kind for _, kind, _ in site.ledger.events()]
    assert kinds.count("federation-exact-disclosure") == 1
    assert approvals.request_status(site.ledger, request.content_hash) == "answered"
    site.refusal(request, RequestError)  # a replay is not answered


def test_exact_answer_below_min_cohort_is_refused_with_a_public_text(tmp_path, site_policy):
    texts = []
    for n, name in ((6, "s6"), (5, "s5")):  # two datasets differing in one participant
        one = Site(tmp_path / name, site_policy, "siteB", simulate(n, 3).head(n))
        request = _exact_request()
        approvals.approve(one.ledger, request)
        texts.append(one.refusal(request, DisclosureError))
        assert one.ledger.audit_trail() == []
        assert approvals.request_status(one.ledger, request.content_hash) == "approved"
    assert texts[0] == texts[1]
    assert "minimum cohort of 10" in texts[0]


# -- refusals before any charge ------------------------------------------------------------------


def test_unapproved_and_altered_requests_are_refused_without_a_charge(site):
    request = make_request()
    text = site.refusal(request, RequestError)
    assert "not approved by the site's data owner; recorded as pending" in text
    assert approvals.request_status(site.ledger, request.content_hash) == "pending"
    approvals.approve(site.ledger, request)
    altered = make_request(delta=2e-5)  # one field changed after the approval
    assert "not approved" in site.refusal(altered, RequestError)
    assert approvals.request_status(site.ledger, altered.content_hash) == "pending"
    assert approvals.request_status(site.ledger, request.content_hash) == "approved"
    assert site.ledger.audit_trail() == [] and site.ledger.spent().epsilon == 0


def test_refusals_on_public_facts(tmp_path, site_policy, site):
    dp_only = site_policy(tmp_path / "dp-only", dataset="siteA")  # [federation] defaults
    cases = [
        (make_request(mode="distributed-dp", min_sites=3), PolicyError, "does not allow mode"),
        (_exact_request(), PolicyError, "allow_exact_secure_sum is not true"),
    ]
    for request, kind, message in cases:
        approvals.approve(PrivacyLedger.from_policy(SitePolicy.from_toml(dp_only)), request)
        assert message in site.refusal(request, kind, policy=dp_only)
    elsewhere = make_request(sites=["siteX", "siteY", "siteZ"])
    assert "not one of the request's sites" in site.refusal(elsewhere, RequestError)
    unknown = make_request(regions=["L_P01", "L_P99"])
    approvals.approve(site.ledger, unknown)
    assert "regions not in the site's atlas: L_P99" in site.refusal(unknown, RequestError)
    assert site.ledger.audit_trail() == []


def test_a_missing_ledger_is_refused_without_naming_local_paths(site):
    site.ledger.path.rename(site.ledger.path.with_suffix(".moved"))
    text = site.refusal(make_request(), PolicyError)
    assert text.endswith("refused: the site's policy or privacy ledger cannot be used")
    assert "/" not in text and "sqlite" not in text


def test_an_exhausted_budget_is_refused_before_any_charge(tmp_path, site_policy):
    site = Site(tmp_path / "b", site_policy, "siteA", simulate(40, 2), epsilon=1.0)
    first, second = make_request(request_id="first"), make_request(request_id="second")
    for request in (first, second):
        approvals.approve(site.ledger, request)
    site.answer(first)
    text = site.refusal(second, PrivacyBudgetExceeded)
    assert text.endswith(
        "refused: the site's privacy budget does not cover epsilon=1, delta=1e-05"
    )
    assert len(site.ledger.audit_trail()) == 1
    # Nothing was used up: the approval still stands for when the owner amends the budget.
    assert approvals.request_status(site.ledger, second.content_hash) == "approved"


def test_refusal_texts_do_not_depend_on_the_data(tmp_path, site_policy):
    """Two datasets differing in one participant give byte-identical refusal texts."""
    texts: dict[str, list[str]] = {}
    for label, rows in (("full", simulate(40, 5)), ("less", simulate(40, 5).iloc[1:])):
        one = Site(tmp_path / label, site_policy, "siteC", rows, epsilon=1.0)
        spent = make_request(request_id="spent", sites=SITES)
        approvals.approve(one.ledger, spent)
        one.answer(spent)
        over = make_request(request_id="over")
        approvals.approve(one.ledger, over)
        unknown = make_request(request_id="unknown", regions=["L_P01", "X_P00"])
        approvals.approve(one.ledger, unknown)
        texts[label] = [
            one.refusal(make_request(request_id="unapproved"), RequestError),
            one.refusal(over, PrivacyBudgetExceeded),
            one.refusal(unknown, RequestError),
            one.refusal(make_request(sites=["a", "b", "c"]), RequestError),
        ]
    assert texts["full"] == texts["less"]
    for text in texts["full"]:
        assert "siteC" in text and "refused" in text and "/" not in text


# -- through a SuperNode's node config ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_node_config_check_then_answer(site):
    config = {
        "site": "siteA",
        "policy": str(site.policy),
        "bids-dir": str(site.folder),
        "derivatives": str(site.folder / "derivatives"),
    }
    request = _exact_request()
    with pytest.raises(RequestError) as err:  # the check round records it as pending
        check_request(request, config)
    assert err.value.public_reason == str(err.value) and "recorded as pending" in str(err.value)
    approvals.approve(site.ledger, request)
    check_request(request, config)  # nothing computed, nothing recorded
    assert approvals.request_status(site.ledger, request.content_hash) == "approved"
    answer = answer_node_request(request, config)
    expected = Grid.for_request(request).encode(raw_vector(request, site.rows, 0))
    np.testing.assert_array_equal(answer.vector, expected)
    # The check round previews the budget: a request the budget cannot cover is refused there.
    costly = make_request(request_id="costly", epsilon=50.0, delta=1e-5)
    approvals.approve(site.ledger, costly)
    with pytest.raises(PrivacyBudgetExceeded, match="does not cover epsilon=50"):
        check_request(costly, config)
    cheap = make_request(request_id="cheap")
    approvals.approve(site.ledger, cheap)
    check_request(cheap, {**config, "bids-dir": str(site.folder / "absent")})  # reads no data
    assert site.ledger.audit_trail() == []
    with pytest.raises(PolicyError, match="key 'policy' is missing"):
        check_request(request, {"site": "siteA"})


# -- dp ------------------------------------------------------------------------------------------


def test_dp_answer_is_charged_before_it_is_returned(site):
    request = make_request()
    approvals.approve(site.ledger, request)
    answer = site.answer(request)
    (record,) = site.ledger.audit_trail()
    assert (record.epsilon, record.delta) == (request.epsilon, request.delta)
    assert record.parameters["request_hash"] == request.content_hash
    assert record.parameters["mode"] == "dp" and record.content_sha256 is not None
    assert record.time < record.released_time and answer.charge_id == record.charge_id
    layout = SumLayout.from_request(request)
    others = np.ones(layout.size, dtype=bool)
    others[layout.slot_range(0)] = others[layout.shared_range] = False
    assert not answer.vector[others].any()  # noise only on the site's own entries
    delta_2 = math.sqrt(1 + 3 + 3 + 3 * 4 / 2 - 2 + 3 * 3 + 3)  # Δ² counted entry by entry
    assert answer.noise_sd == pytest.approx(analytic_gaussian_sigma(1.0, 1e-5, delta_2))
    residual = Grid.for_request(request).decode(answer.vector) - raw_vector(request, site.rows, 0)
    z = residual[~others] / answer.noise_sd
    assert abs(z.mean()) < 6 / math.sqrt(len(z)) and 0.2 < z.std() < 2.0


def test_a_withheld_dp_answer_keeps_its_charge(tmp_path, site_policy):
    site = Site(tmp_path / "w", site_policy, "siteA", simulate(40, 4), extra="min_cohort = 900\n")
    request = make_request(epsilon=5.0)
    approvals.approve(site.ledger, request)
    text = site.refusal(request, DisclosureError)
    assert "answer withheld" in text and "minimum cohort of 900" in text
    (record,) = site.ledger.audit_trail()  # charged before the noise was drawn
    assert record.epsilon == 5.0 and record.content_sha256 is None


def test_spent_epsilon_equals_dp_accountings_composition(site):
    for name in ("one", "two"):
        request = make_request(request_id=name)
        approvals.approve(site.ledger, request)
        answer = site.answer(request)
    delta_2 = math.sqrt(1 + 3 + 3 + 3 * 4 / 2 - 2 + 3 * 3 + 3)
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.GaussianDpEvent(answer.noise_sd / delta_2)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 2))
    expected = min(2.0, accountant.get_epsilon(1e-4))  # the policy's total delta
    assert site.ledger.spent().epsilon == pytest.approx(expected, rel=2e-3)
    assert expected < 1.9  # tight composition, below basic composition's 2


# -- distributed-dp ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_distributed_noise_of_the_sum_has_the_stated_variance(tmp_path, site_policy):
    """K = 3 sites answer R requests; the summed noise (answer minus the independently rounded
    raw vector) per coordinate against K σ_site²: a two-sided chi-square test at 1e-6."""
    sites = [
        Site(tmp_path / name, site_policy, name, simulate(30 + 5 * k, 10 + k), epsilon=50.0)
        for k, name in enumerate(SITES)
    ]
    rounds, sums, sigma_site = 8, [], set()
    for r in range(rounds):
        request = make_request(
            request_id=f"round-{r}", mode="distributed-dp", min_sites=2, max_dropouts=1
        )
        grid = Grid.for_request(request)
        total = np.zeros(SumLayout.from_request(request).size, dtype=np.int64)
        for k, one in enumerate(sites):
            approvals.approve(one.ledger, request)
            answer = one.answer(request)
            noise = answer.vector - grid.encode(raw_vector(request, one.rows, k))
            assert np.count_nonzero(noise) > 0.99 * noise.size  # every coordinate, all slots
            total += noise
            sigma_site.add(answer.noise_sd / answer.grid_step)
        sums.append(total)
    (sigma,) = sigma_site
    # The hub recomputes the same σ from the request alone (public arithmetic).
    hub_noise, hub_grid = request_noise(request)
    assert hub_noise.sigma_site == sigma and hub_grid == grid
    noise = np.concatenate(sums).astype(float)
    statistic = float(np.sum((noise / sigma) ** 2) / len(sites))
    df = noise.size
    lo, hi = scipy_stats.chi2.ppf(5e-7, df), scipy_stats.chi2.isf(5e-7, df)
    assert lo < statistic < hi, (statistic, df)
    # Accounting: (ε, δ) charged and composed by basic composition (a Rényi bound, not a
    # Gaussian mechanism); trust and local floor recorded.
    (record, *_) = sites[0].ledger.audit_trail()
    with contextlib.closing(sqlite3.connect(sites[0].ledger.path)) as conn:
        multipliers = conn.execute("SELECT noise_multiplier FROM charge").fetchall()
    assert multipliers and all(m is None for (m,) in multipliers)
    mechanism = record.parameters["mechanism"]
    assert (record.epsilon, record.delta) == (1.0, 1e-5)
    assert mechanism["sigma_central"] == pytest.approx(math.sqrt(2) * sigma)  # K - t = 2
    assert mechanism["local_floor_epsilon"] > 1.0 and mechanism["tau"] == 0.0
    assert "at most t=1 of the K=3 sites" in record.parameters["trust"]
    # Utility: one site's noise sd against dp mode's (the sum of K - t shares is the central).
    dp_sigma = analytic_gaussian_sigma(1.0, 1e-5, math.sqrt(1 + 3 + 3 + 6 - 2 + 9 + 3))
    print(
        f"chi2 {statistic:.1f} on {df} df (accept {lo:.1f}..{hi:.1f}); distributed-dp "
        f"sigma_site / dp sigma = {sigma * grid.step / dp_sigma:.3f}"
    )
