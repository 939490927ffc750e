"""Runs a federation on Flower's simulation engine (Ray backend) with the project's real ServerApp and ClientApp.

The apps are the same objects `flwr run` loads from `[tool.flwr.app.components]`; here they are built with the
resolved settings baked in, because Flower's in-process entry point passes no run config to the apps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.client_app import make_client_app, secure_aggregation_mod
from client.config import RunSettings
from server.records import RoundRecord, RunSummary
from server.report import write_report
from server.rundir import RunDirectory
from server.server_app import ResumeState, run_federation
from simulation.attacks import ByzantineMod, attacker_partitions
from simulation.attacks import describe as describe_attack
from simulation.federation import federation_plan, federation_stats, simulated_setup

RoundCallback = Callable[[RoundRecord], None]


def simulation_backend_config(*, num_cpus: int | None = None) -> dict[str, Any]:
    """One CPU per simulated client; as many clients in parallel as there are cores."""
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "log_to_driver": False},
    }


@contextlib.contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Keeps Flower's and Ray's per-message INFO lines off the console unless asked for; warnings still show."""
    if verbose:
        yield
        return
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # Only the deprecation notice of the in-process entry point is silenced, nothing global.
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        try:
            yield
        finally:
            flwr_logger.setLevel(previous)


def run_simulation(
    settings: RunSettings,
    *,
    run_dir: RunDirectory,
    on_round: RoundCallback | None = None,
    resume: ResumeState | None = None,
    verbose: bool = False,
    num_cpus: int | None = None,
) -> RunSummary:
    """Runs the simulation described by `settings` and returns its summary.

    The run directory gets the resolved config, partition statistics, per-round metrics, checkpoints, the final
    model, summary.json and report.md with its plots.
    """
    # The public `flwr.simulation.run_simulation` is a thin deprecated wrapper of this function (flwr is pinned to
    # 1.41.0); calling it directly avoids a deprecation banner on every run. Imported late: Ray is slow to import.
    from flwr.supercore.telemetry import EventType
    from flwr.simulation.run_simulation import _run_simulation

    started = time.perf_counter()
    plans = federation_plan(settings)
    if settings.secure_agg:
        # The SecAgg+ quantiser's precision scales with sum(num_examples) / max_weight: use the real largest client.
        settings = settings.replace(secagg_max_weight=float(max(len(p.indices) for p in plans)))
    run_dir.write_config(settings.to_run_config())
    run_dir.write_partition(federation_stats(settings))
    errors: list[BaseException] = []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, context, settings, run_dir=run_dir, resume=resume, on_round=on_round)
        except BaseException as err:  # re-raised in the caller's thread below, with its own message
            errors.append(err)
            raise

    mods: tuple = (secure_aggregation_mod,)
    if settings.attackers:
        # Innermost, so it tampers with what the honest trainer returned, as modified client software would.
        hostile = attacker_partitions(settings, num_sites=len(plans))
        mods += (ByzantineMod(partitions=hostile, attack=settings.attack, seed=settings.seed),)
    client_app = make_client_app(provider=simulated_setup, settings=settings, mods=mods)
    with quiet_flower(verbose):
        _run_simulation(
            num_supernodes=len(plans),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=simulation_backend_config(num_cpus=num_cpus),
            verbose_logging=verbose,
        )
    if errors:
        raise errors[0]
    summary = run_dir.summary().replace(
        wall_seconds=time.perf_counter() - started,
        synthetic=any(p.dataset_spec.startswith("synthetic") for p in plans),
        num_clients=len(plans),
        **describe_attack(settings, client_ids=[p.client_id for p in plans]),
    )
    run_dir.write_summary(summary)
    write_report(run_dir.path)
    return summary
