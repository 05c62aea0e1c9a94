"""The exception hierarchy of fednipype: every error names the file and the field."""


class FednipypeError(Exception):
    """Base class of every error fednipype raises on purpose."""


class BIDSError(FednipypeError):
    """A BIDS dataset, its participants table or a derivative is not as expected."""


class DataError(FednipypeError, ValueError):
    """Input values are malformed: non-numeric, infinite, missing where not allowed, misshapen."""


class ImageError(FednipypeError):
    """An image or an atlas cannot be read or does not fit the analysis."""


class PolicyError(FednipypeError):
    """A site policy file is missing, unreadable or has an invalid value."""


class PrivacyBudgetExceeded(FednipypeError):
    """A release or training run would spend more than the site's privacy budget."""


class DisclosureError(FednipypeError):
    """A release would disclose a statistic over too few participants."""


class ReleaseValidationError(FednipypeError):
    """A release document does not conform to the release schema."""


class MetaAnalysisError(FednipypeError):
    """Site results cannot be pooled as asked."""


class RequestError(FednipypeError):
    """A federated analysis request is malformed, altered or not approved."""


class FederationError(FednipypeError):
    """A federated run cannot start or complete (unreachable SuperLink, too few sites)."""
