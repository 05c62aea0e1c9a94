"""The privacy planner: standard errors of a pooled DP regression, predicted from public inputs.

From the model's terms (public bounds, an assumed distribution within them), the response's
bounds and assumed residual sd, the number of released regions, ε and δ per site and the
sites' sizes, :func:`predict` gives each coefficient's standard error in the pooled regression
with site intercepts (:func:`fednipype.hub.regression.pooled_regression`), original units:
sampling plus DP noise on ZᵀZ and ZᵀY. :func:`required_epsilon` and :func:`required_n` invert
it. It is first order in the noise; where the noise on ZᵀZ is comparable to ZᵀZ's small
eigenvalues (the hub's solve is then noise, its eigenvalue floor shrinks the estimates) the
result says so (:attr:`Plan.first_order` false, with a reason). Public arithmetic only.

Examples
--------
>>> scenario = Scenario.of(
...     [Covariate.numeric("age", (18.0, 90.0)), Covariate.dummy("sex[M]", 0.5)],
...     Response((0.0, 12000.0), residual_sd=150.0, mean=7000.0),
...     n=[500] * 10, epsilon=1.0, delta=1e-5, regions=5,
... )
>>> predict(scenario).first_order, round(predict(scenario).se("age"), 1)
(True, 6.0)
"""

from fednipype.plan.inverse import Requirement, required_epsilon, required_n
from fednipype.plan.model import (
    FIRST_ORDER_LIMIT,
    Covariate,
    Plan,
    PlanError,
    Response,
    Scenario,
    Site,
    noise_sd,
    predict,
    uniform_moments,
)

__all__ = [
    "FIRST_ORDER_LIMIT",
    "Covariate",
    "Plan",
    "PlanError",
    "Requirement",
    "Response",
    "Scenario",
    "Site",
    "noise_sd",
    "predict",
    "required_epsilon",
    "required_n",
    "uniform_moments",
]
