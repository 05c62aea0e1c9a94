"""Code that runs at a site: the design matrix, the privacy layer (policy, ledger, mechanisms) and the release."""
