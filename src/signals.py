"""SIGTERM (how SLURM preempts and `timeout` stops a job) and SIGINT (Ctrl-C) end a run the same way: during
training, after the current batch, with a checkpoint saved and the MLflow run KILLED, so it can be resumed;
outside training, at once. A second signal stops at once.

Lightning's own SIGTERM handling (`received_sigterm`, then `SIGTERMException` at the next batch end) is what
stops training gracefully; SIGINT is routed into the same path instead of Lightning's `sys.exit(1)`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class Stopped(BaseException):
    """Raised where a stop signal cannot wait for a batch end (not an `Exception`: nothing may swallow it)."""


class GracefulStop(pl.Callback):
    """The process's stop-signal state (one per process: signals are). Installed by `src.run`; also a callback, so
    it knows when a fit is running and which checkpoint a resume starts from."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.trainer: pl.Trainer | None = None
        self.checkpoint: Path | None = None  # where the interrupted state is saved
        self.saved: Path | None = None
        self.run_id: str | None = None  # the MLflow run to name in the resume hint

    def install(self) -> None:
        self.signum, self.trainer, self.saved = None, None, None
        if threading.current_thread() is threading.main_thread():  # signal handlers can only live there
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def describe(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        if not self.saved:
            return f"Stopped by {name} before the first epoch ended: nothing to resume"
        return f"Stopped by {name}; checkpoint saved at {self.saved}. Resume: python -m src.run resume={self.run_id}"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if first and self.trainer is not None:
            log.warning("%s received: stopping after this batch (again to stop at once)", signal.Signals(signum).name)
            self.trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException at batch end
            return
        raise Stopped(signal.Signals(signum).name)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """The resume point is the last epoch-end checkpoint (ModelCheckpoint's `last.ckpt`), not a mid-epoch
        save: Lightning restores a mid-epoch state without that epoch's validation, so a resumed run would miss
        one `val/*` point. A resume therefore redoes the interrupted epoch whole."""
        self.trainer = None
        if self.signum is not None and self.checkpoint is not None and self.checkpoint.is_file():
            self.saved = self.checkpoint


STOP = GracefulStop()
