"""The planner's inverse: the ε or the n a target standard error needs.

Root finding on :func:`fednipype.plan.model.predict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.optimize import brentq

from fednipype.plan.model import Plan, PlanError, Scenario, _positive, predict

__all__ = ["Requirement", "required_epsilon", "required_n"]


@dataclass(frozen=True)
class Requirement:
    """What a target standard error of ``term`` needs: the smallest ``value`` of ``parameter``
    (``"epsilon"`` per site, or ``"n"`` per site, a whole number), None when none reaches it;
    ``plan`` at that value (its ``first_order`` says whether to trust it), and ``reason``: why
    there is no value, or the plan's reason."""

    parameter: str
    term: str
    target_se: float
    value: float | None
    plan: Plan | None
    reason: str


def _check_target(scenario: Scenario, term: str, target_se: float) -> float:
    if term not in scenario.terms:
        raise PlanError(f"term {term!r} not in the model ({', '.join(scenario.terms)})")
    return _positive(target_se, f"target SE of {term}")


def _bracket(excess, lo: float, hi: float, limit: float, term: str, target: float):
    """Widen ``[lo, hi]`` (log scale) by decades until ``excess`` changes sign in it."""
    while excess(lo) < 0:
        lo -= math.log(10.0)
    while excess(hi) > 0:
        hi += math.log(10.0)
        if hi > limit:
            raise PlanError(f"{term}: no value up to {math.exp(limit):.0e} reaches SE {target:g}")
    return lo, hi


def required_epsilon(scenario: Scenario, term: str, target_se: float) -> Requirement:
    """The smallest ε, the same at every site, giving ``term`` a SE of ``target_se``.

    Root finding on :func:`predict`, whose SE falls with ε towards its noise-free limit; a
    target below that limit cannot be reached with these sizes (``value`` None).

    Parameters
    ----------
    scenario : Scenario
        Everything but ε.
    term : str
        A term of the model (``intercept`` included).
    target_se : float
        Original units.

    Returns
    -------
    Requirement
    """
    target = _check_target(scenario, term, target_se)
    floor = predict(scenario.with_epsilon(math.inf)).se(term)
    if floor >= target:
        reason = f"even without DP noise the SE of {term} is {floor:.4g} with these sizes"
        return Requirement("epsilon", term, target, None, None, reason + ": more participants")

    def excess(log_eps: float) -> float:
        return math.log(predict(scenario.with_epsilon(math.exp(log_eps))).se(term) / target)

    lo, hi = _bracket(excess, math.log(1e-3), math.log(10.0), math.log(1e12), term, target)
    value = math.exp(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-10)) * (1.0 + 1e-9)
    plan = predict(scenario.with_epsilon(value))
    return Requirement("epsilon", term, target, value, plan, plan.reason)


def required_n(scenario: Scenario, term: str, target_se: float) -> Requirement:
    """The smallest n, the same at every site, giving ``term`` a SE of ``target_se``.

    The number of sites and their ε, δ stay; the SE falls as n grows (a site's noise does not
    grow with n). Parameters and result as :func:`required_epsilon`.
    """
    target = _check_target(scenario, term, target_se)
    k, c = len(scenario.sites), len(scenario.covariates)
    smallest = (k + c + 1) / k + 1e-9

    def excess(log_n: float) -> float:
        return math.log(predict(scenario.with_n(math.exp(log_n))).se(term) / target)

    lo = math.log(smallest)
    if excess(lo) <= 0:
        value = math.ceil(smallest)
    else:
        _, hi = _bracket(
            excess, lo, math.log(max(smallest * 2.0, 100.0)), math.log(1e15), term, target
        )
        value = math.ceil(math.exp(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-10)) - 1e-6)
        while predict(scenario.with_n(value)).se(term) > target:
            value += 1
    plan = predict(scenario.with_n(value))
    return Requirement("n", term, target, float(value), plan, plan.reason)
