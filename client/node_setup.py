"""What a node trains with: its data and its profile applied to the run's settings.

Both the deployed ClientApp (client/client_app.py, from `--node-config`) and the simulator (simulation/federation.py,
from the federation plan) build a `NodeSetup`, and the training client (client/trainer.py) reads it. It lives in its
own module below all three so that none of them imports another for it (client_app.py and trainer.py used to import
each other for this class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.config import RunSettings
from client.node_data import NodeData
from client.profiles import ClientProfile


@dataclass(frozen=True)
class NodeSetup:
    """Everything node-specific a client needs: its data and how it trains (from its profile)."""

    data: NodeData
    profile: str
    local_epochs: int
    batch_size: int
    state_dir: Path

    @classmethod
    def with_profile(
        cls, *, data: NodeData, profile: ClientProfile | None, settings: RunSettings, state_dir: Path
    ) -> NodeSetup:
        """Applies a client profile: its local epochs and batch size replace the run's; no profile keeps the run's
        and is named "default" in metrics and reports."""
        return cls(
            data=data,
            profile=profile.name if profile else "default",
            local_epochs=profile.local_epochs if profile else settings.local_epochs,
            batch_size=profile.batch_size if profile else settings.train_batch_size,
            state_dir=state_dir,
        )
