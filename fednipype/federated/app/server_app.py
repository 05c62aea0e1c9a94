"""The hub's Flower server app: check round, one SecAgg+ round, ``OUT_DIR/secure_sum.json``.

With ``task = "training"`` in the run config it runs federated training instead
(:func:`fednipype.federated.app.training_server.run_training`: check round, FedAvg rounds
through SecAgg+, the model file); ``task = "statistics"`` (the default) is the secure sum.

Run config keys (``[tool.flwr.app.config]`` of this app's ``pyproject.toml``): ``request``,
``out-dir``, ``min-sites``, ``num-shares``, ``reconstruction-threshold``, ``timeout``,
``connect-timeout``, ``site-bound``, ``secure-aggregation``; see
:class:`fednipype.federated.app.server.RunSettings`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednipype.exceptions import FederationError
from fednipype.federated.app.server import run_secure_sum

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated secure sum (or training) of the request named in the run config."""
    task = context.run_config.get("task", "statistics")
    if task == "training":
        # Imported here: a statistics run needs neither the models nor the model file.
        from fednipype.federated.app.training_server import run_training

        run_training(grid, context)
    elif task == "statistics":
        run_secure_sum(grid, context)
    else:
        raise FederationError(
            f"run config: key 'task': expected 'statistics' or 'training', got {task!r}"
        )
