"""The privacy layer: site policy, budget ledger and differentially private statistics."""

from fednipype.privacy.ledger import AuditRecord, Budget, PrivacyLedger, Spend
from fednipype.privacy.mechanisms import (
    STATISTICS,
    BudgetSplit,
    DPResult,
    DPSufficientStatistics,
    Mechanism,
    PreparedStatistic,
    add_gaussian_noise,
    add_laplace_noise,
    analytic_gaussian_sigma,
    dp_count,
    dp_group_means,
    dp_histogram,
    dp_mean,
    dp_sufficient_statistics,
    dp_variance,
    prepare,
    sufficient_statistics_sensitivity,
)
from fednipype.privacy.policy import SitePolicy

__all__ = [
    "STATISTICS",
    "AuditRecord",
    "Budget",
    "BudgetSplit",
    "DPResult",
    "DPSufficientStatistics",
    "Mechanism",
    "PreparedStatistic",
    "PrivacyLedger",
    "SitePolicy",
    "Spend",
    "add_gaussian_noise",
    "add_laplace_noise",
    "analytic_gaussian_sigma",
    "dp_count",
    "dp_group_means",
    "dp_histogram",
    "dp_mean",
    "dp_sufficient_statistics",
    "dp_variance",
    "prepare",
    "sufficient_statistics_sensitivity",
]
