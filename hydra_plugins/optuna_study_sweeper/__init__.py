"""Hydra plugins of transfer-lab: the `optuna_study` sweeper and the `sweep` config group served from sweeps/."""
