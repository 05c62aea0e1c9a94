"""The privacy planner (``fednipype.plan``, ``fednipype-plan``) against independent references.

- Its predicted standard errors against the empirical SD of pooled estimates over replicate
  releases: data rows simulated with numpy, released through the real mechanism (OpenDP
  noise), pooled by the hub's ``pooled_regression``, unscaled with the contract's ``Scaling``.
- Its noise-free limit against statsmodels' OLS on a design with exactly the assumed moments.
- Its inverse against its forward prediction; its flag on the bundled sites' sizes.
- The command: table, plot, one-line errors with their exit codes, no Nipype.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from support import BUNDLED, SITES

from fednipype.cli import plan as plan_cli
from fednipype.cli.demo import find_sites, plan_text
from fednipype.cli.errors import EXIT_PRIVACY, EXIT_USAGE
from fednipype.contract.scaling import INTERCEPT, Scaling
from fednipype.hub.regression import pooled_regression
from fednipype.participants import read_participants
from fednipype.plan import (
    FIRST_ORDER_LIMIT,
    Covariate,
    PlanError,
    Response,
    Scenario,
    noise_sd,
    predict,
    required_epsilon,
    required_n,
    uniform_moments,
)
from fednipype.site.mechanisms import prepare_sufficient_statistics

#: The planner's claim: predicted SE within this fraction of the true SD of the estimates.
TOLERANCE = 0.15
#: False-alarm rate of each acceptance band (per design, ε and term).
FALSE_ALARM = 1e-6
REPLICATES = 400
DELTA = 1e-5
VOLUME = (0.0, 12000.0)
AGE = Covariate.numeric("age", (18.0, 90.0))
SEX = Covariate.dummy("sex[M]", 0.5)
GROUP = Covariate.dummy("group[patient]", 0.3)
DUMMIES = {"sex[M]", "group[patient]"}

#: Designs where the first-order approximation holds at both ε (noise ratio <= 0.11).
DESIGNS = {
    "one site, age": dict(
        covariates=[AGE],
        response=Response(VOLUME, residual_sd=300.0, mean=6000.0, effects={"age": -20.0}),
        n=[2000],
        regions=2,
    ),
    "three sites, own age ranges": dict(
        covariates=[AGE, SEX],
        response=Response(
            VOLUME, residual_sd=200.0, mean=9000.0, effects={"age": -20.0, "sex[M]": 200.0}
        ),
        n=[300, 400, 500],
        regions=1,
        assumed=[
            {"age": uniform_moments(20.0, 45.0)},
            {"age": uniform_moments(45.0, 80.0)},
            {"age": uniform_moments(25.0, 85.0)},
        ],
    ),
    "three sites, own public age ranges": dict(
        covariates=[AGE, SEX],
        response=Response(
            VOLUME, residual_sd=200.0, mean=9000.0, effects={"age": -20.0, "sex[M]": 200.0}
        ),
        n=[300, 400, 500],
        regions=1,
        assumed=[
            {"age": uniform_moments(20.0, 45.0)},
            {"age": uniform_moments(45.0, 80.0)},
            {"age": uniform_moments(25.0, 85.0)},
        ],
        # each site releases age in its own recruitment range; the hub converts
        bounds=[{"age": (20.0, 45.0)}, {"age": (45.0, 80.0)}, {"age": (25.0, 85.0)}],
    ),
    "three sites, three terms": dict(
        covariates=[AGE, SEX, GROUP],
        response=Response(
            VOLUME,
            residual_sd=250.0,
            mean=7000.0,
            effects={"age": -17.0, "group[patient]": -600.0},
        ),
        n=[600, 600, 600],
        regions=1,
    ),
}
EPSILONS = {
    "one site, age": (1.0, 8.0),
    "three sites, own age ranges": (2.0, 8.0),
    "three sites, own public age ranges": (2.0,),
    "three sites, three terms": (1.0, 4.0),
}
CASES = [(design, eps) for design, pair in EPSILONS.items() for eps in pair]


def _scenario(design: str, epsilon: float) -> Scenario:
    return Scenario.of(epsilon=epsilon, delta=DELTA, **DESIGNS[design])


# -- simulation through the real release and pooling code --------------------------------------


def _site_rows(scenario: Scenario, site, rng: np.random.Generator):
    """Covariates drawn as assumed (dummies Bernoulli, numeric uniform with the assumed mean and
    sd) and one response column per region, in original units."""
    n = int(site.n)
    columns, means = [], []
    for c in scenario.covariates:
        mean, sd = site.assumed.get(c.name, (c.mean, c.sd))
        if c.name in DUMMIES:
            columns.append((rng.random(n) < mean).astype(float))
        else:
            half = sd * math.sqrt(3.0)
            columns.append(rng.uniform(mean - half, mean + half, n))
        means.append(mean)
    x = np.column_stack(columns)
    effects = np.array([scenario.response.effects.get(c.name, 0.0) for c in scenario.covariates])
    expected = scenario.response.mean + (x - np.array(means)) @ effects
    sd = scenario.response.residual_sd
    y = expected[:, None] + rng.normal(0.0, sd, (n, scenario.regions))
    return np.column_stack([np.ones(n), x]), y


def _replicates(scenario: Scenario, reps: int, seed: int) -> tuple[pd.DataFrame, int]:
    """Pooled estimates (original units) of the first region over ``reps`` replicate
    consortia, each site's release drawn by the real mechanism; and how many fits floored
    ZᵀZ's eigenvalues."""
    rng = np.random.default_rng(seed)
    terms = scenario.terms
    regions = tuple(f"R{r:02d}" for r in range(scenario.regions))

    def scaling_of(site) -> Scaling:  # the site's own public ranges where it has them
        return Scaling.from_bounds(
            numeric={
                c.name: site.bounds.get(c.name, c.bounds)
                for c in scenario.covariates
                if c.name not in DUMMIES
            },
            dummies=[c.name for c in scenario.covariates if c.name in DUMMIES],
            regions=dict.fromkeys(regions, scenario.response.bounds),
        )

    own = [scaling_of(site) for site in scenario.sites]
    scaling = Scaling.envelope(own, terms)
    units = [site.conversion_to(scaling, terms) for site in own]
    z_bounds, y_bounds = Scaling.design_bounds(terms), Scaling.response_bounds(regions)
    tables, projected = [], 0
    for rep in range(reps):
        released = []
        for site, site_scaling in zip(scenario.sites, own, strict=True):
            z, y = _site_rows(scenario, site, rng)
            prepared = prepare_sufficient_statistics(
                site_scaling.scale_design(z, terms),
                site_scaling.scale_response(y, regions),
                z_bounds,
                y_bounds,
                site.epsilon,
                site.delta,
                terms=terms,
                regions=regions,
                max_participants=10_000,
                # n released once, as make_release does (the planner's σ follows it)
                n_terms=(terms[0], *(t for t in terms if t in DUMMIES)),
            )
            released.append(prepared._draw())  # OpenDP noise, no ledger (a test)
        fit = pooled_regression(released, units=units)
        fit = fit[fit["region"] == regions[0]]
        projected += bool(fit["psd_projected"].any())
        columns = ["region", "term", "estimate", "se", "ci_low", "ci_high"]
        tables.append(fit[columns].assign(replicate=rep))
    table = scaling.unscale(pd.concat(tables, ignore_index=True))
    return table.pivot(index="replicate", columns="term", values="estimate")[
        list(terms)
    ], projected


def _acceptance_band(reps: int, excess_kurtosis: float) -> tuple[float, float]:
    """Band for empirical SD / predicted SE: if the true SD is within TOLERANCE of the
    prediction, the ratio falls outside with probability <= FALSE_ALARM.

    (N − 1) s²/σ² ~ χ²(N − 1) for normal estimates; a positive excess kurtosis κ widens it to
    the effective df 2(N − 1)/(2 + κ), from Var(s²) ≈ σ⁴ (2/(N − 1) + κ/N).
    """
    df = (reps - 1) * 2.0 / (2.0 + max(excess_kurtosis, 0.0))
    lo = math.sqrt(stats.chi2.ppf(FALSE_ALARM / 2.0, df) / df)
    hi = math.sqrt(stats.chi2.isf(FALSE_ALARM / 2.0, df) / df)
    return (1.0 - TOLERANCE) * lo, (1.0 + TOLERANCE) * hi


@pytest.mark.parametrize(("design", "epsilon"), CASES, ids=[f"{d}-eps{e:g}" for d, e in CASES])
def test_predicted_se_matches_the_sd_of_released_estimates(
    design, epsilon, record_property, caplog
):
    # the hub notes each fit whose residual variance is floored at its noise level (expected)
    caplog.set_level(logging.ERROR, logger="fednipype.hub.regression")
    scenario = _scenario(design, epsilon)
    plan = predict(scenario)
    assert plan.first_order and plan.noise_ratio <= FIRST_ORDER_LIMIT
    # the DP noise is a real part of what is checked, not a rounding error
    assert (plan.table["se_noise"] / plan.table["se"]).min() > 0.5
    estimates, projected = _replicates(scenario, REPLICATES, seed=CASES.index((design, epsilon)))
    assert projected == 0
    empirical = estimates.std(ddof=1)
    for term in scenario.terms:
        ratio = empirical[term] / plan.se(term)
        lo, hi = _acceptance_band(REPLICATES, float(stats.kurtosis(estimates[term])))
        record_property(f"{term}: empirical SD / predicted SE", round(float(ratio), 4))
        assert lo <= ratio <= hi, (
            f"{design}, epsilon={epsilon}, {term}: empirical SD {empirical[term]:.4g} over "
            f"{REPLICATES} releases, predicted {plan.se(term):.4g} (ratio {ratio:.3f}, "
            f"acceptance band [{lo:.3f}, {hi:.3f}])"
        )


def test_acceptance_band_is_what_it_says():
    lo, hi = _acceptance_band(REPLICATES, 0.0)
    # 400 replicates: the SD itself is known to ~3.5 %; the band adds ~5 sd to ±15 %
    assert 0.65 < lo < 0.75 and 1.3 < hi < 1.4


# -- the noise-free limit against statsmodels --------------------------------------------------


def _exact_design(age_ranges, sizes):
    """Rows whose covariate moments are exact: an age grid crossed with sex, per site."""
    rows = []
    for site, ((lo, hi), n) in enumerate(zip(age_ranges, sizes, strict=True)):
        ages = np.linspace(lo, hi, n // 2)
        for sex in (0.0, 1.0):
            rows.append(pd.DataFrame({"site": site, "age": ages, "sex[M]": sex}))
    return pd.concat(rows, ignore_index=True)


def test_noise_free_limit_equals_statsmodels_ols_on_the_expected_design():
    ranges, sizes = [(20.0, 45.0), (45.0, 80.0), (25.0, 85.0)], [40, 60, 90]
    rows = _exact_design(ranges, sizes)
    residual_sd = 150.0
    # statsmodels: y ~ 0 + C(site) + age + sex, residuals orthogonal to the design with
    # exactly the assumed residual variance, so its σ̂ is the planner's σ
    x = np.column_stack(
        [(rows["site"] == k).to_numpy(float) for k in range(3)] + [rows["age"], rows["sex[M]"]]
    )
    noise = np.random.default_rng(3).normal(size=len(rows))
    noise -= x @ np.linalg.lstsq(x, noise, rcond=None)[0]
    df_resid = len(rows) - x.shape[1]
    noise *= residual_sd * math.sqrt(df_resid) / np.linalg.norm(noise)
    y = 7000.0 - 20.0 * rows["age"].to_numpy() + 150.0 * rows["sex[M]"].to_numpy() + noise
    fit = sm.OLS(y, x).fit()
    # the planner's intercept: the participant-weighted site intercept at the covariates'
    # centres (the middle of their bounds)
    weights = np.array([*(np.array(sizes) / sum(sizes)), 54.0, 0.5])
    reference = {
        INTERCEPT: math.sqrt(weights @ fit.cov_params() @ weights),
        "age": fit.bse[3],
        "sex[M]": fit.bse[4],
    }
    per_site = rows.groupby("site")
    assumed = [
        {"age": (g["age"].mean(), g["age"].std(ddof=0)), "sex[M]": (0.5, 0.5)} for _, g in per_site
    ]
    covariates = [Covariate.numeric("age", (18.0, 90.0)), Covariate.dummy("sex[M]", 0.5)]
    response = Response(VOLUME, residual_sd=residual_sd, mean=6000.0)
    scenario = Scenario.of(
        covariates,
        response,
        n=sizes,
        epsilon=math.inf,
        delta=DELTA,
        regions=3,
        assumed=assumed,
    )
    plan = predict(scenario)
    assert plan.noise_sd == (0.0, 0.0, 0.0) and plan.first_order
    for term, se in reference.items():
        assert plan.se(term) == pytest.approx(se, rel=1e-9)
        assert plan.table.set_index("term").loc[term, "se_noise"] == 0.0
    # ε → ∞ converges to it
    assert predict(scenario.with_epsilon(1e9)).se("age") == pytest.approx(
        reference["age"], rel=1e-6
    )
    # with the uniform assumption instead of the grid's exact moments: the grid's variance is
    # (m + 1)/(m − 1) times the uniform's, which bounds the difference
    uniform = [{"age": uniform_moments(*r)} for r in ranges]
    rough = predict(_with_assumed(scenario, uniform)).se("age")
    m = min(sizes) // 2
    assert abs(rough / reference["age"] - 1.0) < math.sqrt((m + 1) / (m - 1)) - 1.0 + 1e-3


def _with_assumed(scenario: Scenario, assumed) -> Scenario:
    return Scenario.of(
        scenario.covariates,
        scenario.response,
        n=[s.n for s in scenario.sites],
        epsilon=[s.epsilon for s in scenario.sites],
        delta=[s.delta for s in scenario.sites],
        regions=scenario.regions,
        assumed=assumed,
    )


# -- the noise scale, the inverse, the flag -----------------------------------------------------


def test_noise_scale_is_the_mechanisms():
    z = np.column_stack([np.ones(30), np.linspace(-1, 1, 30), np.tile([-1.0, 1.0], 15)])
    y = np.zeros((30, 7))
    prepared = prepare_sufficient_statistics(
        z,
        y,
        Scaling.design_bounds(["intercept", "a", "b"]),
        Scaling.response_bounds([f"r{i}" for i in range(7)]),
        0.7,
        DELTA,
        terms=["intercept", "a", "b"],
        regions=[f"r{i}" for i in range(7)],
        max_participants=1000,
        n_terms=("intercept", "b"),  # as make_release: n once, b a ±1 dummy
    )
    sigma, sensitivity = noise_sd(2, 7, 0.7, DELTA, dummies=(1,))
    assert sigma == prepared.mechanism.noise_scale
    assert sensitivity == prepared.mechanism.sensitivity


@pytest.mark.parametrize("design", list(DESIGNS))
def test_required_epsilon_and_n_recover_the_target(design):
    scenario = _scenario(design, 1.0)
    for term in ("age", INTERCEPT):
        target = 0.5 * predict(scenario).se(term)
        eps = required_epsilon(scenario, term, target)
        assert eps.parameter == "epsilon" and eps.value is not None and eps.value > 1.0
        assert predict(scenario.with_epsilon(eps.value)).se(term) == pytest.approx(target, 1e-7)
        assert predict(scenario.with_epsilon(eps.value * 0.999)).se(term) > target
        assert eps.plan is not None and eps.plan.se(term) <= target

        size = required_n(scenario, term, target)
        assert size.value is not None and size.value == int(size.value)
        assert predict(scenario.with_n(size.value)).se(term) <= target
        assert predict(scenario.with_n(size.value - 1)).se(term) > target


def test_required_epsilon_says_when_no_epsilon_is_enough():
    scenario = _scenario("three sites, three terms", 1.0)
    floor = predict(scenario.with_epsilon(math.inf)).se("age")
    answer = required_epsilon(scenario, "age", 0.9 * floor)
    assert answer.value is None and answer.plan is None
    assert "without DP noise" in answer.reason and "participants" in answer.reason
    with pytest.raises(PlanError, match="bogus"):
        required_n(scenario, "bogus", 1.0)
    with pytest.raises(PlanError, match="target SE"):
        required_n(scenario, "age", -1.0)


def _bundled_sizes() -> list[int]:
    return [len(read_participants(BUNDLED / site)) for site in SITES]


def _release_model(regions: int, n, epsilon: float) -> Scenario:
    return Scenario.of(
        [AGE, SEX, Covariate.dummy("group[patient]", 0.5)],
        Response(VOLUME, residual_sd=150.0, mean=6500.0),
        n=n,
        epsilon=epsilon,
        delta=DELTA,
        regions=regions,
    )


def test_flag_on_the_bundled_sites_at_epsilon_one():
    sizes = _bundled_sizes()
    assert sizes == [24, 30, 45]
    plan = predict(_release_model(100, sizes, 1.0))
    assert plan.noise_sd[0] == pytest.approx(84.08, abs=0.01)  # σ(1, 1e-5, √508): n once
    assert not plan.first_order and plan.noise_ratio > 5
    assert "ZᵀZ" in plan.reason and "order of magnitude" in plan.reason
    # still flagged with 5 pre-registered regions: 24–45 participants are too few at ε = 1
    assert not predict(_release_model(5, sizes, 1.0)).first_order


def test_no_flag_for_ten_sites_of_500_at_epsilon_one():
    plan = predict(_release_model(5, [500] * 10, 1.0))
    assert plan.first_order and plan.reason == ""
    assert plan.noise_ratio < FIRST_ORDER_LIMIT


def test_bad_inputs_name_the_field():
    with pytest.raises(PlanError, match="age: bounds"):
        Covariate.numeric("age", (90.0, 18.0))
    with pytest.raises(PlanError, match="impossible"):
        Covariate("age", (18.0, 90.0), 20.0, 30.0)
    with pytest.raises(PlanError, match="share"):
        Covariate.dummy("sex[M]", 1.5)
    with pytest.raises(PlanError, match="residual degrees of freedom"):
        _release_model(5, [1, 1], 1.0)
    with pytest.raises(PlanError, match="epsilon: 2 value"):
        Scenario.of(
            [AGE],
            Response(VOLUME, residual_sd=1.0),
            n=[10, 10, 10],
            epsilon=[1.0, 2.0],
            delta=DELTA,
            regions=1,
        )
    with pytest.raises(PlanError, match="vary within no site"):
        predict(
            Scenario.of(
                [AGE],
                Response(VOLUME, residual_sd=1.0),
                n=[50, 50],
                epsilon=1.0,
                delta=DELTA,
                regions=1,
                assumed=[{"age": (30.0, 0.0)}, {"age": (60.0, 0.0)}],
            )
        )


# -- the command ----------------------------------------------------------------------------


FLAGS = ["--age-bounds", "18", "90", "--response-bounds", "0", "12000", "--residual-sd", "150"]


def test_cli_prints_the_table(capsys):
    code = plan_cli.main(["--n", "24", "30", "45", "--epsilon", "1", "--regions", "100", *FLAGS])
    out = capsys.readouterr().out
    assert code == 0
    for term in ("intercept", "age", "sex[M]", "group[patient]"):
        line = next(x for x in out.splitlines() if x.startswith(term + " "))
        assert line.endswith("first order fails") and "~" in line
    assert "first order fails: the DP noise on ZᵀZ" in out

    code = plan_cli.main(["--n", *["500"] * 10, "--epsilon", "1", "--regions", "5", *FLAGS])
    out = capsys.readouterr().out
    assert code == 0
    expected = predict(
        Scenario.of(
            [AGE, SEX, Covariate.dummy("group[patient]", 0.5)],
            Response(VOLUME, residual_sd=150.0),
            n=[500] * 10,
            epsilon=1.0,
            delta=DELTA,
            regions=5,
        )
    )
    line = next(x for x in out.splitlines() if x.startswith("age "))
    assert line.split()[1] == f"{expected.se('age'):.4g}" and line.endswith("ok")


def test_cli_reads_bounds_from_a_policy_and_solves_the_target(tmp_path, capsys, site_policy):
    policy = site_policy(tmp_path, bind=False)
    plot = tmp_path / "plots" / "se.png"
    argv = ["--n", "24", "30", "45", "--epsilon", "1", "--regions", "L_P12", "R_P12"]
    argv += ["--policy", str(policy), "--residual-sd", "150", "--target-se", "age", "5"]
    assert plan_cli.main([*argv, "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "response: L_P12, R_P12 (bounds 0 to 12000)" in captured.out
    assert "2 region(s) per release" in captured.out
    lines = [x for x in captured.out.splitlines() if x.startswith("SE 5 for age")]
    assert len(lines) == 2 and "epsilon per site" in lines[0] and "n per site" in lines[1]
    scenario = Scenario.of(
        [AGE, SEX, Covariate.dummy("group[patient]", 0.5)],
        Response(VOLUME, residual_sd=150.0),
        n=[24, 30, 45],
        epsilon=1.0,
        delta=DELTA,
        regions=2,
    )
    assert f">= {required_epsilon(scenario, 'age', 5.0).value:.3g}" in lines[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


BAD = {
    "missing-epsilon": (["--n", "24", "--regions", "3", *FLAGS], EXIT_USAGE, "--epsilon"),
    "n-zero": (["--n", "0", "--epsilon", "1", "--regions", "3", *FLAGS], EXIT_USAGE, "--n"),
    "n-text": (["--n", "ten", "--epsilon", "1", "--regions", "3", *FLAGS], EXIT_USAGE, "--n"),
    "epsilon-negative": (
        ["--n", "24", "--epsilon=-1", "--regions", "3", *FLAGS],
        EXIT_PRIVACY,
        "epsilon",
    ),
    "epsilon-nan": (
        ["--n", "24", "--epsilon", "nan", "--regions", "3", *FLAGS],
        EXIT_PRIVACY,
        "epsilon",
    ),
    "delta-one": (
        ["--n", "24", "--epsilon", "1", "--delta", "1", "--regions", "3", *FLAGS],
        EXIT_PRIVACY,
        "delta",
    ),
    "no-bounds": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", "--residual-sd", "1"],
        EXIT_USAGE,
        "--age-bounds",
    ),
    "no-residual": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", *FLAGS[:6]],
        EXIT_USAGE,
        "--residual-sd",
    ),
    "bounds-reversed": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", *FLAGS[3:], "--age-bounds", "90", "18"],
        EXIT_USAGE,
        "age: bounds",
    ),
    "too-few": (
        ["--n", "2", "--epsilon", "1", "--regions", "3", *FLAGS],
        EXIT_USAGE,
        "degrees of freedom",
    ),
    "target-term": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", *FLAGS, "--target-se", "height", "5"],
        EXIT_USAGE,
        "height",
    ),
    "target-value": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", *FLAGS, "--target-se", "age", "x"],
        EXIT_USAGE,
        "--target-se",
    ),
    "regions-zero": (
        ["--n", "24", "--epsilon", "1", "--regions", "0", *FLAGS],
        EXIT_USAGE,
        "--regions",
    ),
    "plot-not-png": (
        ["--n", "24", "--epsilon", "1", "--regions", "3", *FLAGS, "--plot", "se.txt"],
        EXIT_USAGE,
        "--plot",
    ),
    "policy-missing": (
        [
            "--n",
            "24",
            "--epsilon",
            "1",
            "--regions",
            "3",
            "--residual-sd",
            "1",
            "--policy",
            "no-such-policy.toml",
        ],
        EXIT_PRIVACY,
        "no-such-policy",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_with_its_exit_code(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, code, culprit = BAD[case]
    try:
        result = plan_cli.main(argv)
    except SystemExit as exit_info:
        result = exit_info.code
    captured = capsys.readouterr()
    assert result == code, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fednipype-plan: error: "), captured.err
    assert culprit in lines[0] and "Traceback" not in captured.err
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_cli_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "exit codes:" in capsys.readouterr().out


def test_the_command_runs_without_nipype():
    """``fednipype-plan`` (run as a program) imports no Nipype, pybids, nibabel or OpenDP."""
    code = (
        "import json, sys\n"
        "from fednipype.cli import plan\n"
        "rc = plan.main(['--n', '24', '--epsilon', '1', '--regions', '3', '--age-bounds', '18',"
        " '90', '--response-bounds', '0', '1', '--residual-sd', '0.1'])\n"
        "heavy = ('nipype', 'bids', 'nibabel', 'opendp', 'fednipype.site.mechanisms')\n"
        "print(json.dumps({'rc': rc, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "loaded": []}


def test_the_demo_prints_the_plan_of_the_bundled_sites():
    text = plan_text(find_sites(BUNDLED), 1.0, DELTA)
    assert "n = 24, 30, 45" in text and "100 region(s)" in text
    assert "first order fails" in text
    needs = [x for x in text.splitlines() if "SE 5 for age" in x]
    assert len(needs) == 4 and all(">=" in x for x in needs)
