"""One error path: whatever stops a run ends in one readable line on screen, a status code that says why, and the
full traceback in a file (never on screen).

Exit codes: 2 a user mistake (`ConfigError`: config, data, backbone, environment), 128 + signal number when stopped
by SIGTERM/SIGINT (143/130), 1 anything else (a bug: the line names the log file to report).
`TRANSFER_LAB_TRACEBACK=1` puts the traceback back on screen, for developers.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from src.schema import ConfigError

if TYPE_CHECKING:
    from src.signals import GracefulStop

ERROR_LOG = "error.log"


def _stop() -> GracefulStop | None:
    """`src.signals.STOP` when a stop signal ended the run. Looked up only if something loaded `src.signals` (it
    imports Lightning): before that no handler is installed, and a config error must not pay for the import."""
    signals = sys.modules.get("src.signals")
    return signals.STOP if signals is not None and signals.STOP.signum is not None else None


def exit_code(exc: BaseException) -> int:
    if (stop := _stop()) is not None:
        return 128 + stop.signum
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 2 if isinstance(exc, ConfigError) else 1


def one_line(exc: BaseException) -> str:
    """What the user reads: the message alone for their own mistakes, the type too for anything else."""
    if (stop := _stop()) is not None:
        return stop.describe()
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted (Ctrl-C)"
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the library wrote
    if isinstance(exc, ConfigError):
        return f"Error: {text}"
    return f"Error: {type(exc).__name__}: {text}"


def _only_hydra_files(folder: Path) -> bool:
    return all(p.name in (".hydra", "run.log") for p in folder.iterdir())


@contextmanager
def one_clear_answer(output_dir: Path, multirun: bool) -> Iterator[None]:
    """Turns any exception of the run into one line + an exit code; a failed multirun job only prints its line
    (its MLflow run and Optuna trial record the failure), so the other jobs go on and the grid's summary runs."""
    try:
        yield
    except SystemExit as e:  # Lightning's SIGTERMException after a graceful stop; else a deliberate exit
        if _stop() is None:
            raise
        _report(e, output_dir, multirun)
    except BaseException as e:  # noqa: BLE001 - every way out is reported
        _report(e, output_dir, multirun)


def _report(exc: BaseException, output_dir: Path, multirun: bool) -> None:
    if os.environ.get("TRANSFER_LAB_TRACEBACK") == "1":
        raise exc
    line = one_line(exc)
    detail = ""
    if output_dir.is_dir() and _only_hydra_files(output_dir) and isinstance(exc, ConfigError) and not multirun:
        shutil.rmtree(output_dir, ignore_errors=True)  # a config that never ran leaves no empty output folder
    elif output_dir.is_dir():
        log = output_dir / ERROR_LOG
        log.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if not isinstance(exc, ConfigError) and _stop() is None:
            detail = f"\n  (full traceback: {log})"
    print(f"{line}{detail}", file=sys.stderr, flush=True)
    if multirun and _stop() is None:
        return
    sys.exit(exit_code(exc))
