"""Federated statistics on Flower: the app, its transport, certificates and local deployment."""
