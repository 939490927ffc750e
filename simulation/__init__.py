"""Federated simulations on Flower's simulation engine: partitioning, client profiles, the `fer-sim` CLI."""
