"""The coordinator's side: the Flower ServerApp, strategies, update validation, evaluation, run directories."""
