"""Optuna sweeps: the `sweep` config node, storage with heartbeats, a job's trial, the sweeper loop, MLflow parent."""
