"""A trivial Flower app that proves a deployment works end to end (query, answer, print)."""
