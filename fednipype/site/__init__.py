"""Code that runs at a site: design matrix, privacy (policy, ledger, mechanisms), the release."""
