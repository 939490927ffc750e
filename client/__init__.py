"""What runs on a hospital's or home hub's node: data, preprocessing, local training, the Flower ClientApp."""

import os as _os

# Patient-facing infrastructure phones home to nobody: Flower's telemetry and Ray's usage statistics are off unless
# an operator explicitly turns them back on. Set before any flwr/ray import reads them.
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
