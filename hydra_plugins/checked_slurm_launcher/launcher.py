"""`hydra/launcher: slurm | slurm_cpu`: hydra-submitit-launcher's SLURM launcher that cannot hang a sweep silently.

Before the first submission the request is checked against the cluster (`src.sweep.slurm.preflight`); while
waiting, the jobs are watched (`src.sweep.slurm.watch`), and a job that ends without a result (cancelled, killed,
lost) becomes a FAILED job return instead of an exception that would end the wait for every other job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides

log = logging.getLogger(__name__)

try:  # the `launchers` extra; without it Hydra's plugin scan must still import this module
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:
    SlurmLauncher = None

if SlurmLauncher is not None:

    class CheckedSlurmLauncher(SlurmLauncher):
        _checked = False

        def preflight(self) -> None:
            """Fail with one message naming the launcher keys if the cluster can never run a trial's job."""
            if not self._checked:
                from src.sweep import slurm

                slurm.preflight(self.params)
                self._checked = True

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            """As BaseSubmititLauncher.launch (one job array), but checked first and waited for by `watch`."""
            import submitit
            from omegaconf import OmegaConf

            from src.sweep import slurm

            self.preflight()
            params = dict(self.params)
            executor = submitit.AutoExecutor(
                cluster="slurm",
                folder=params.pop("submitit_folder"),
                slurm_max_num_timeout=params.pop("max_num_timeout"),
            )
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
            Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            job_params = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
            log.info("SLURM job array %s: %d job(s)", jobs[0].job_id.split("_")[0], len(jobs))
            ends = slurm.watch(jobs)
            return [job_return(*args) for args in zip(jobs, job_overrides, ends, strict=True)]

    def job_return(job: Any, overrides: Sequence[str], lost: Exception | None) -> JobReturn:
        """The job's own JobReturn, or a FAILED one holding why it has none (cancelled, timed out, lost)."""
        try:
            if lost is not None:
                raise lost
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 - every way a job can end is that job's result
            failed = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
            failed.return_value = e
            return failed
