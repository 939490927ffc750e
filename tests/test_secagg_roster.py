"""The SecAgg+ roster a coordinator hands out and a site pins (issue 10 item 6): written by `fer-server roster`,
checked by `fer-client start` before the node joins."""

from __future__ import annotations

import click
import pytest

from client.cli.runner import run_cli
from client.cli.start_cmd import _secagg_node_config
from client.deploy import generate_node_keys
from client.node_config import NodeSettings
from privacy.secagg_identity import SECAGG_ROSTER, identity_of, load_roster


def _make_sites(tmp_path, names=("site-a", "site-b")):
    """Key pairs of a few sites, as `fer-client keygen` makes them."""
    return {name: generate_node_keys(out_dir=tmp_path / "keys", name=name) for name in names}


def _write_roster(tmp_path, sites) -> tuple[int, object]:
    """Runs `fer-server roster` in-process over the sites' public keys; returns the exit code and the file."""
    from server.cli import main as server_main

    server_main._register()
    out = tmp_path / "certs" / SECAGG_ROSTER
    out.parent.mkdir(exist_ok=True)
    code = run_cli(server_main.app, "fer-server",
                   ["roster", *[str(k.public_key) for k in sites.values()], "--out", str(out)])
    return code, out


def test_roster_command_writes_every_sites_key_and_the_site_pins_it(tmp_path):
    """The roster maps each site to its enrolled key; a site in it gets node-key, roster and floor in its config."""
    # Prepare
    sites = _make_sites(tmp_path)

    # Execute
    code, roster = _write_roster(tmp_path, sites)
    fields = _secagg_node_config(None, ca_cert=roster.parent / "ca.crt", key=sites["site-a"].private_key,
                                 min_threshold=3)
    written = NodeSettings(dataset="synthetic=8", **fields).to_node_config()  # as fer-client start writes it
    config = {key: written[key] for key in ("secagg-min-threshold", "node-key", "secagg-roster")}

    # Assert
    assert code == 0
    assert load_roster(roster) == {identity_of(k.private_key): name for name, k in sites.items()}
    assert config == {"secagg-min-threshold": 3, "node-key": str(sites["site-a"].private_key.resolve()),
                      "secagg-roster": str(roster.resolve())}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("stranger", "this node's key"),
        ("no-key", "--secagg-roster needs --key"),
        ("low-floor", "--secagg-min-threshold must be at least 2"),
        ("garbage", "entry 'site-a' is not an OpenSSH public key"),
    ],
)
def test_site_refuses_to_start_with_a_roster_it_cannot_use(tmp_path, case, message):
    """A roster without this node, a roster without a key, a floor below 2 or a broken file: one clear error."""
    # Prepare
    sites = _make_sites(tmp_path)
    stranger = generate_node_keys(out_dir=tmp_path / "keys", name="stranger")
    _, roster = _write_roster(tmp_path, sites)
    if case == "garbage":
        roster.write_text("site-a: not a key\n")
    key = {"stranger": stranger.private_key, "no-key": None}.get(case, sites["site-a"].private_key)

    # Execute / Assert
    with pytest.raises(click.ClickException, match=message):
        _secagg_node_config(roster, ca_cert=None, key=key, min_threshold=1 if case == "low-floor" else 2)
