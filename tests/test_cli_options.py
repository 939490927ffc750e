"""Option groups that several commands share (client/cli/runner.py `option_group`): declared once, each reaches a
command whole, from the command line or its defaults, and every command that shares a group offers all of it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import typer

from client.cli.runner import add_commands, cli_app, option_group, run_cli
from privacy.cli_options import PrivacyOptions
from server.cli.serve_cmd import ListenOptions


def _make_app(received: list) -> typer.Typer:
    """A two-command app whose `probe` takes both groups between its own options and records what it gets."""
    app = cli_app("probe", "Probe.")

    @option_group(ListenOptions, into="listen")
    @option_group(PrivacyOptions, into="privacy")
    def probe(
        name: str = "x", privacy: PrivacyOptions = PrivacyOptions(), seed: int = 0,
        listen: ListenOptions = ListenOptions(),
    ) -> None:
        received.append((name, privacy, seed, listen))

    add_commands(app, {"probe": probe, "noop": lambda: None})
    return app


def test_a_command_without_group_options_gets_the_groups_defaults():
    """No option given: the command receives the two dataclasses' defaults, its own options untouched."""
    # Prepare
    received: list = []

    # Execute
    code = run_cli(_make_app(received), "probe", ["probe"])

    # Assert
    assert code == 0
    assert received == [("x", PrivacyOptions(), 0, ListenOptions())]


def test_group_options_on_the_command_line_reach_the_command_as_one_object():
    """Flags of both groups, mixed with the command's own, arrive typed in the group objects."""
    # Prepare
    received: list = []
    args = ["probe", "--dp-epsilon", "2.5", "--no-secure-agg", "--port", "1234", "--seed", "3",
            "--enroll", "a.pub", "--enroll", "b.pub", "--insecure", "--name", "y"]

    # Execute
    code = run_cli(_make_app(received), "probe", args)

    # Assert
    assert code == 0
    ((name, privacy, seed, listen),) = received
    assert (name, seed) == ("y", 3)
    assert privacy == PrivacyOptions(dp_epsilon=2.5, secure_agg=False)
    assert privacy.overrides()["dp-epsilon"] == 2.5 and privacy.overrides()["secure-agg"] is False
    assert listen == ListenOptions(port=1234, enroll=[Path("a.pub"), Path("b.pub")], insecure=True)


def test_a_command_without_the_named_parameter_is_refused_when_declared():
    """option_group on a command that has no `into` parameter fails at import time, naming both."""
    # Execute / Assert
    with pytest.raises(TypeError, match="lonely has no parameter 'privacy'"):

        @option_group(PrivacyOptions, into="privacy")
        def lonely(seed: int = 0) -> None:
            pass


@pytest.mark.parametrize(
    ("prog", "command", "group"),
    [("fer-server", "start", PrivacyOptions), ("fer-server", "start", ListenOptions),
     ("fer-server", "resume", ListenOptions), ("fer-sim", "run", PrivacyOptions),
     ("fer-sim", "centralized", PrivacyOptions)],
)
def test_every_command_sharing_a_group_offers_all_its_options(prog, command, group):
    """The real commands list each field of their groups as an option with the field's default."""
    # Prepare
    from server.cli import main as server_main
    from simulation.cli import main as sim_main

    module = server_main if prog == "fer-server" else sim_main
    module._register()

    # Execute
    params = {p.name: p for p in typer.main.get_command(module.app).commands[command].params}

    # Assert
    for field in fields(group):
        assert field.name in params, field.name
        assert params[field.name].default == field.default, field.name
