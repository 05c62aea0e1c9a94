"""``fednipype-plan``: predict the standard errors a DP release design would give, before spending.

::

    fednipype-plan --n 24 30 45 --epsilon 1 --regions 100 --policy policy.toml \\
        --residual-sd 150 [--delta 1e-5] [--target-se age 5] [--plot se_vs_epsilon.png]

From public inputs only (bounds from the site policy or the flags, an assumed distribution of
the covariates and an assumed residual sd of the response, the sites' sizes, ε and δ per
site, the number of released regions) it prints, for the release's model (age, sex, group)
pooled with site intercepts, each term's predicted standard error in original units and the
part of it the DP noise adds; where the first-order prediction does not hold it prints only
an order of magnitude and says why. A policy whose ``[bounds.features] default`` is ``"atlas"``
needs ``--atlas-resolution 1|2``: the plan then bounds each region by the default atlas's region
on its own grid (features computed on another grid have other maxima; give
``--response-bounds`` for those). ``--target-se TERM SE`` adds the ε per site and the n per
site that would reach that standard error; ``--plot`` draws the standard errors against ε.
Nothing is read from any dataset and nothing is spent.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fednipype.cli.console import setup_logging
from fednipype.cli.errors import ArgumentParser, HelpFormatter, UsageError, exit_epilog, guarded
from fednipype.exceptions import PolicyError
from fednipype.plan import (
    Covariate,
    Plan,
    PlanError,
    Requirement,
    Response,
    Scenario,
    predict,
    required_epsilon,
    required_n,
)
from fednipype.site.policy import SitePolicy

PROG = "fednipype-plan"
#: The release's model after the intercept (fednipype.site.design.ModelSpec's default).
TERMS = ("age", "sex[M]", "group[patient]")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``fednipype-plan``."""
    parser = ArgumentParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description=(
            "Predict the standard errors a DP release design would give in the pooled "
            "regression, before anything is spent (public bounds and stated assumptions only)."
        ),
        epilog=exit_epilog(),
    )
    sites = parser.add_argument_group("sites and privacy")
    sites.add_argument(
        "--n",
        nargs="+",
        type=_count,
        required=True,
        metavar="N",
        help="participants per site, one number per site (e.g. --n 24 30 45)",
    )
    sites.add_argument(
        "--epsilon", type=float, required=True, help="privacy loss of each site's release"
    )
    sites.add_argument("--delta", type=float, default=1e-5, help="delta of each site's release")
    sites.add_argument(
        "--regions",
        nargs="+",
        required=True,
        metavar="R",
        help="regions per release: a number, or the region names (bounds per region from "
        "--policy)",
    )
    bounds = parser.add_argument_group("public bounds (flags override the policy)")
    bounds.add_argument("--policy", type=Path, help="a site policy (TOML) to take bounds from")
    bounds.add_argument(
        "--atlas-resolution",
        type=int,
        choices=(1, 2),
        help='with a policy whose [bounds.features] default is "atlas": the features are '
        "computed on fednipype's default atlas's own grid at this resolution (mm); each region "
        "is bounded by its voxels on that grid x the voxel volume",
    )
    bounds.add_argument(
        "--age-bounds", nargs=2, type=_finite, metavar=("LO", "HI"), help="public age bounds"
    )
    bounds.add_argument(
        "--response-bounds",
        nargs=2,
        type=_finite,
        metavar=("LO", "HI"),
        help="public bounds of every region's feature",
    )
    assumed = parser.add_argument_group("assumptions (not data: a plan reads no dataset)")
    assumed.add_argument(
        "--age-range",
        nargs=2,
        type=_finite,
        metavar=("LO", "HI"),
        help="ages assumed uniform in this range (default: the age bounds)",
    )
    assumed.add_argument("--age-mean", type=_finite, help="assumed mean age (years)")
    assumed.add_argument("--age-sd", type=_finite, help="assumed sd of age within a site")
    assumed.add_argument("--sex-share", type=_finite, default=0.5, help="assumed share of sex M")
    assumed.add_argument(
        "--patient-share", type=_finite, default=0.5, help="assumed share of group patient"
    )
    assumed.add_argument(
        "--residual-sd", type=_finite, help="assumed residual sd of a region's feature"
    )
    assumed.add_argument(
        "--r2", type=_finite, help="or: assumed R² of the model (with --response-sd)"
    )
    assumed.add_argument("--response-sd", type=_finite, help="assumed sd of a region's feature")
    assumed.add_argument(
        "--response-mean",
        type=_finite,
        help="assumed mean of a region's feature (default: the middle of its bounds)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--target-se",
        nargs=2,
        metavar=("TERM", "SE"),
        help="also print the epsilon and the n per site that give TERM this standard error",
    )
    out.add_argument("--plot", type=Path, metavar="FILE.png", help="plot SE against epsilon")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="tracebacks on error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fednipype-plan`` and return its exit code (see ``fednipype-plan --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    return guarded(PROG, lambda: _run(args), verbose=args.verbose)


# -- from the arguments to scenarios -----------------------------------------------------------


def _regions(values: list[str]) -> tuple[int, list[str] | None]:
    if len(values) == 1:
        try:
            count = float(values[0])
        except ValueError:
            count = None
        if count is not None:
            if count < 1 or count != int(count):
                raise UsageError(f"--regions: expected a number >= 1 or names, got {values[0]}")
            return int(count), None
    if len(set(values)) != len(values):
        raise UsageError(f"--regions: a region is named twice in {values}")
    return len(values), values


def _response(args: argparse.Namespace, bounds: tuple[float, float]) -> Response:
    if args.residual_sd is not None:
        if args.r2 is not None:
            raise UsageError("--residual-sd and --r2: give one of them")
        return Response(bounds, residual_sd=args.residual_sd, mean=args.response_mean)
    if args.r2 is None:
        raise UsageError(
            "--residual-sd (or --r2 with --response-sd): the plan needs an assumed residual sd "
            "of the response"
        )
    if args.response_sd is None:
        raise UsageError("--r2: needs --response-sd (the response's assumed total sd)")
    return Response.from_r2(bounds, sd=args.response_sd, r2=args.r2, mean=args.response_mean)


def _atlas_maxima(policy: SitePolicy, resolution: int | None) -> dict[str, float]:
    """The default atlas's regions' largest possible volumes on its own grid (mm3)."""
    if resolution is None:
        raise UsageError(
            f"--atlas-resolution: {policy.source} bounds the regions by the atlas ([bounds."
            'features] default = "atlas"); give the resolution (1 or 2 mm) of the default '
            "atlas grid the features are computed on, or --response-bounds LO HI"
        )
    # Imported here: the atlas and its grid need nibabel, which the plan otherwise never loads.
    from fednipype.atlas import default_atlas
    from fednipype.grids import atlas_max_volumes

    atlas = default_atlas(resolution)
    return atlas_max_volumes(atlas.image, atlas.labels)


def scenarios(args: argparse.Namespace) -> list[tuple[str, Scenario]]:
    """One scenario per distinct response bounds among the regions, labelled by its regions."""
    policy = SitePolicy.from_toml(args.policy) if args.policy is not None else None
    if policy is not None and policy.max_participants is not None:
        if args.delta >= 1.0 / policy.max_participants:
            raise PolicyError(
                f"--delta {args.delta:g} is not below 1/max_participants = "
                f"{1.0 / policy.max_participants:g} of {policy.source}: a release would be refused"
            )
    age_bounds = args.age_bounds
    if age_bounds is None:
        if policy is None:
            raise UsageError("--age-bounds or --policy: the plan needs public age bounds")
        age_bounds = policy.covariate_bounds("age")
    age = Covariate.numeric(
        "age", age_bounds, mean=args.age_mean, sd=args.age_sd, within=args.age_range
    )
    covariates = [
        age,
        Covariate.dummy("sex[M]", args.sex_share),
        Covariate.dummy("group[patient]", args.patient_share),
    ]
    count, names = _regions(args.regions)
    groups: dict[tuple[float, float], list[str]] = {}
    if args.response_bounds is not None:
        groups[tuple(args.response_bounds)] = names or [f"each of {count} region(s)"]
    elif policy is None:
        raise UsageError("--response-bounds or --policy: the plan needs public response bounds")
    elif names is None:
        if policy.atlas_default:
            largest = max(_atlas_maxima(policy, args.atlas_resolution).values())
            groups[(0.0, largest)] = [
                f"each of {count} region(s), bounded by the default atlas's largest region at "
                f"{args.atlas_resolution} mm"
            ]
        else:
            groups[policy.feature_bounds("default")] = [f"each of {count} region(s)"]
    else:
        maxima: dict[str, float] = {}
        if policy.atlas_default and set(names) - set(policy.feature_bounds_map):
            maxima = _atlas_maxima(policy, args.atlas_resolution)
            unknown = [n for n in names if n not in maxima and n not in policy.feature_bounds_map]
            if unknown:
                raise UsageError(
                    f"--regions: {', '.join(unknown)}: not region(s) of the default atlas "
                    f"({next(iter(maxima))} … {next(reversed(maxima))})"
                )
        for name in names:
            bounds = policy.feature_bounds(name, atlas_max=maxima.get(name))
            groups.setdefault(bounds, []).append(name)
    out = []
    for bounds, labels in groups.items():
        scenario = Scenario.of(
            covariates,
            _response(args, bounds),
            n=args.n,
            epsilon=args.epsilon,
            delta=args.delta,
            regions=count,
        )
        out.append((", ".join(labels), scenario))
    return out


# -- printing ---------------------------------------------------------------------------------


def _number(value: float, precise: bool) -> str:
    if not precise:
        return f"~{value:.0e}"
    return f"{value:.4g}"


def format_plan(plan: Plan, label: str | None = None) -> str:
    """The plan as a text table: term, predicted SE, its sampling and DP parts, the flag.

    Where the first-order approximation fails the SE and its DP part are shown as an order of
    magnitude only (``~2e+03``), and the reason follows the table.
    """
    scenario = plan.scenario
    sizes = ", ".join(f"{s.n:g}" for s in scenario.sites)
    eps = sorted({s.epsilon for s in scenario.sites})
    dlt = sorted({s.delta for s in scenario.sites})
    lines = [
        f"{len(scenario.sites)} site(s), n = {sizes}; epsilon = "
        f"{', '.join(f'{e:g}' for e in eps)} and delta = {', '.join(f'{d:g}' for d in dlt)} per "
        f"site; {scenario.regions} region(s) per release",
        f"noise sd per released entry {', '.join(sorted({f'{s:.4g}' for s in plan.noise_sd}))} "
        f"(released [-1, 1] units; L2 sensitivity {plan.sensitivity:.4g}); noise ratio "
        f"{plan.noise_ratio:.2g}",
    ]
    if label:
        lines.insert(
            0,
            f"response: {label} (bounds {scenario.response.bounds[0]:g} to "
            f"{scenario.response.bounds[1]:g})",
        )
    flag = "ok" if plan.first_order else "first order fails"
    lines.append(f"{'term':<16} {'SE':>10} {'sampling':>10} {'DP noise':>10}  flag")
    for row in plan.table.itertuples():
        lines.append(
            f"{row.term:<16} {_number(row.se, plan.first_order):>10} "
            f"{row.se_sampling:>10.4g} {_number(row.se_noise, plan.first_order):>10}  {flag}"
        )
    lines.append(
        "SE in original units: the response's units per unit of each term (the intercept, a "
        "pooled mean at the covariates' centres, in the response's units)"
    )
    if not plan.first_order:
        lines.append(f"first order fails: {plan.reason}")
    return "\n".join(lines)


def format_requirement(requirement: Requirement, scenario: Scenario) -> str:
    """One line: what reaches the target SE, or why nothing does."""
    what = f"SE {requirement.target_se:g} for {requirement.term}"
    if requirement.parameter == "epsilon":
        head = f"{what}: epsilon per site (n = {', '.join(f'{s.n:g}' for s in scenario.sites)})"
    else:
        eps = ", ".join(sorted({f"{s.epsilon:g}" for s in scenario.sites}))
        head = f"{what}: n per site ({len(scenario.sites)} site(s), epsilon = {eps})"
    if requirement.value is None:
        return f"{head}: not reachable: {requirement.reason}"
    if requirement.parameter == "epsilon":
        value = f"{requirement.value:.3g}"
    else:
        value = f"{requirement.value:.0f}"
    trusted = requirement.plan is not None and requirement.plan.first_order
    note = "" if trusted else " (first order fails there: a rough guide)"
    return f"{head} >= {value}{note}"


def plot_curves(
    scenario: Scenario,
    path: Path,
    *,
    target: tuple[str, float] | None = None,
    reach: float | None = None,
) -> Path:
    """Write a PNG of each slope's predicted SE against ε (dotted where first order fails),
    with the target SE, over ε up to at least ``reach``."""
    # matplotlib is heavy and only needed for --plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = scenario.sites[0].epsilon
    top = max(1000.0, chosen * 30.0, 3.0 * (reach or 0.0))
    epsilons = np.geomspace(min(0.1, chosen / 3.0), top, 60)
    frames = []
    for epsilon in epsilons:
        plan = predict(scenario.with_epsilon(float(epsilon)))
        frames.append(plan.table.assign(epsilon=epsilon, first_order=plan.first_order))
    curve = pd.concat(frames, ignore_index=True)
    terms = list(scenario.terms[1:])
    fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.6), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        rows = curve[curve["term"] == term]
        good = rows["first_order"].to_numpy()
        ax.loglog(rows["epsilon"], np.where(good, rows["se"], np.nan), "C0-", label="first order")
        ax.loglog(
            rows["epsilon"], np.where(good, np.nan, rows["se"]), "C0:", label="first order fails"
        )
        ax.axhline(rows["se_sampling"].iloc[-1], color="0.5", lw=0.8, label="without DP noise")
        ax.axvline(chosen, color="C1", lw=0.8, label=f"epsilon = {chosen:g}")
        if target is not None and target[0] == term:
            ax.axhline(target[1], color="C3", lw=0.8, ls="--", label=f"target SE {target[1]:g}")
        ax.set_title(term)
        ax.set_xlabel("epsilon per site")
        ax.set_ylabel("predicted SE (original units)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{len(scenario.sites)} site(s), n = {', '.join(f'{s.n:g}' for s in scenario.sites)}, "
        f"{scenario.regions} region(s)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _run(args: argparse.Namespace) -> int:
    target = None
    if args.target_se is not None:
        term, text = args.target_se
        try:
            target = (term, _finite(text))
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"--target-se: {err}") from None
        if term not in ("intercept", *TERMS):
            raise UsageError(
                f"--target-se: unknown term {term!r}; expected one of intercept, "
                f"{', '.join(TERMS)}"
            )
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot: expected a .png file name, got {args.plot}")
    try:
        plans = [(label, scenario, predict(scenario)) for label, scenario in scenarios(args)]
        requirements = []
        if target is not None:
            for _, scenario, _ in plans:
                requirements.append(
                    (
                        required_epsilon(scenario, *target),
                        required_n(scenario, *target),
                    )
                )
    except PlanError as err:
        raise UsageError(str(err)) from None
    for i, (label, scenario, plan) in enumerate(plans):
        if i:
            print()
        print(format_plan(plan, label))
        if requirements:
            for requirement in requirements[i]:
                print(format_requirement(requirement, scenario))
    if args.plot is not None:
        label, scenario, _ = plans[0]
        reach = requirements[0][0].value if requirements else None
        path = plot_curves(scenario, args.plot, target=target, reach=reach)
        which = f" (response: {label})" if len(plans) > 1 else ""
        print(f"plot: {path}{which}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
