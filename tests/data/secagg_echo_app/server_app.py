"""The test app's server app: fednipype's own, unchanged."""

from fednipype.federated.app.server_app import app

__all__ = ["app"]
