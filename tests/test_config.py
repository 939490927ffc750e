"""The run configuration: one typed object, identical to the keys Flower reads from pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from client.config import ConfigError, RunSettings
from client.config_file import read_run_config_file

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_config_matches_settings_keys_and_defaults():
    """[tool.flwr.app.config] lists exactly the settings' keys, with the settings' defaults."""
    table = _pyproject_app_config()

    assert list(table) == RunSettings.keys()
    assert RunSettings.from_run_config(table) == RunSettings()


def test_round_trip_through_run_config():
    """to_run_config and from_run_config are inverse."""
    settings = RunSettings(strategy="krum", num_clients=7, alpha=0.1, secure_agg=False)

    assert RunSettings.from_run_config(settings.to_run_config()) == settings


@pytest.mark.parametrize(
    ("run_config", "names"),
    [
        ({"stratgy": "fedavg"}, "stratgy"),
        ({"strategy": "fedsgd"}, "strategy"),
        ({"num-clients": "ten"}, "num-clients"),
        ({"num-clients": 2.5}, "num-clients"),
        ({"fraction-fit": 0.0}, "fraction-fit"),
        ({"alpha": -1.0}, "alpha"),
        ({"secure-agg": True, "strategy": "krum"}, "secure-agg"),
        ({"secure-agg": "maybe"}, "secure-agg"),
        ({"dp-lr": 0.0}, "dp-lr"),
        ({"public-batch-size": -8}, "public-batch-size"),
        ({"public-lr": -0.01}, "public-lr"),
        ({"dp-optimizer": "rmsprop"}, "dp-optimizer"),
        ({"dp-batch-size": 0}, "dp-batch-size"),
        ({"server-ema": 1.0}, "server-ema"),
        ({"server-ema": -0.5}, "server-ema"),
        ({"server-tau": 0.0}, "server-tau"),
    ],
)
def test_invalid_values_name_the_key(run_config, names):
    """Every invalid value raises ConfigError whose one-line message names the key."""
    with pytest.raises(ConfigError) as err:
        RunSettings.from_run_config(run_config)

    assert names in str(err.value)
    assert "\n" not in str(err.value)


def test_string_booleans_and_integral_floats_are_coerced():
    """Values typed on a command line (strings, 3.0) become the field's type."""
    settings = RunSettings.from_run_config({"secure-agg": "true", "num-server-rounds": 3.0, "lr": "0.01"})

    assert settings.secure_agg is True
    assert settings.num_server_rounds == 3
    assert settings.lr == pytest.approx(0.01)


def test_dp_runs_train_with_the_dp_recipe_and_plain_runs_with_their_own():
    """Under dp-epsilon clients use dp-optimizer / dp-lr / dp-batch-size; without it optimizer / lr / batch-size."""
    # Prepare
    plain = RunSettings(optimizer="adam", lr=3e-4, batch_size=32, dp_optimizer="sgd", dp_lr=0.05, dp_batch_size=128)
    private = plain.replace(dp_epsilon=3.0)

    # Execute / Assert
    assert (plain.train_optimizer, plain.train_lr, plain.train_batch_size) == ("adam", 3e-4, 32)
    assert (private.train_optimizer, private.train_lr, private.train_batch_size) == ("sgd", 0.05, 128)


@pytest.mark.parametrize("text", [
    'num-server-rounds = 3\ndataset = ["synthetic=20", "synthetic=30"]\n',
    '[tool.flwr.app.config]\nnum-server-rounds = 3\ndataset = ["synthetic=20", "synthetic=30"]\n',
])
def test_run_config_file_flat_or_pyproject_table_reads_the_same(tmp_path, text):
    """A flat TOML and a pyproject-style table give the same run config; a dataset list joins with ';'."""
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text(text)
    # Execute
    config = read_run_config_file(path)
    # Assert
    assert config == {"num-server-rounds": 3, "dataset": "synthetic=20;synthetic=30"}


@pytest.mark.parametrize(("text", "message"), [
    (None, "config file {path} does not exist"),
    ("x = [", "{path}: not valid TOML ("),
])
def test_run_config_file_errors_name_the_file(tmp_path, text, message):
    """A missing or broken config file is one ConfigError naming it."""
    # Prepare
    path = tmp_path / "run.toml"
    if text is not None:
        path.write_text(text)
    # Execute
    with pytest.raises(ConfigError) as caught:
        read_run_config_file(path)
    # Assert
    assert str(caught.value).startswith(message.format(path=path))
