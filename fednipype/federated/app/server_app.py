"""The hub's Flower server app: check round, one SecAgg+ round, ``OUT_DIR/secure_sum.json``.

Run config keys (``[tool.flwr.app.config]`` of this app's ``pyproject.toml``): ``request``,
``out-dir``, ``min-sites``, ``num-shares``, ``reconstruction-threshold``, ``timeout``,
``connect-timeout``, ``site-bound``, ``secure-aggregation``; see
:class:`fednipype.federated.app.server.RunSettings`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednipype.federated.app.server import run_secure_sum

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated secure sum of the request named in the run config."""
    run_secure_sum(grid, context)
