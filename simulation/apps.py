"""The Flower app components `flwr run` loads (see `[tool.flwr.app.components]` in pyproject.toml).

The ClientApp is the one in `client.client_app` with the simulation data provider: a simulated node trains on its
partition of the run's dataset; a real node (one started with a `dataset` in its node config) on its own data.
The ServerApp is `server.server_app:app`; it is not imported here, so a ClientApp process stays free of it.
"""

from __future__ import annotations

from client.client_app import make_client_app, secure_aggregation_mod
from simulation.federation import simulated_setup

client_app = make_client_app(provider=simulated_setup, mods=(secure_aggregation_mod,))

__all__ = ["client_app"]
