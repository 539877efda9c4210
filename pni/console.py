"""What the command-line tools print: one line per stage, at most one progress bar, and no
third-party chatter unless ``--verbose``.

- :func:`setup` (every CLI calls it once, after parsing its flags): quiet by default:
  deprecation warnings and Lightning's hints, tips and device banners are dropped, and the
  warnings that remain print as one ``warning: ...`` line. ``verbose=True`` keeps Python's
  and Lightning's own output, Lightning's progress bars included.
- :class:`Progress`: one stage's line. On a terminal it redraws in place (a bar, the
  percentage, the elapsed time) and ends as ``<title>  done in 12.3 s``; when the output is
  a file or a pipe it prints the title, at most one percentage line per quarter of the work
  (and none within :data:`LOG_INTERVAL_S` of the previous line), and ``done in ...``: no
  carriage returns.
- :func:`trainer_progress`: the ``pl.Trainer`` arguments that show a Lightning run
  (fit, predict, test) as one such bar, or Lightning's own bars under ``--verbose``.
- :func:`print_table` / :func:`titled`: a score table set apart by a blank line and a title.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 2.0  # least time between two percentage lines in a log
BAR_WIDTH = 24
_REDRAW_S = 0.1  # least time between two redraws on a terminal

# Lightning's hints that say nothing to a user of these tools (the data loaders are small
# on purpose, a CPU run is chosen at run time, the predict steps return nothing by design).
_LIGHTNING_HINTS = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*predict returned None.*",
    r".*is smaller than the logging interval.*",
    r".*Trying to infer the `batch_size`.*",
    r".*litlogger.*",
    r".*litmodels.*",
)
# Lightning logs its banners through its rank-zero loggers; importing pytorch_lightning sets
# its package logger back to INFO, so the children are quietened too (setup may run first).
_THIRD_PARTY_LOGGERS = tuple(
    f"{package}{child}"
    for package in (
        "pytorch_lightning",
        "lightning_fabric",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_utilities",
    )
    for child in ("", ".utilities.rank_zero", ".core.rank_zero")
)

_state = {"verbose": False}


def is_verbose() -> bool:
    """Whether :func:`setup` was asked for everything (``--verbose``)."""
    return _state["verbose"]


def _one_line(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """``warnings.formatwarning`` of the quiet console: ``warning: <message>`` on one line."""
    return f"warning: {' '.join(str(message).split())}\n"


def setup(verbose: bool = False) -> None:
    """Quiet (default) or verbose console for this process; see the module docstring."""
    _state["verbose"] = bool(verbose)
    if verbose:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for pattern in _LIGHTNING_HINTS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = _one_line  # how shown warnings look; recorders (pytest.warns) are left alone
    # device banners ("GPU available: ..."), the "💡 Tip" lines: Lightning logs them at INFO
    for name in _THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 60 else f"{int(t // 60)} min {int(t % 60):02d} s"


class Progress:
    """One stage's line with an optional progress bar over ``total`` units (see the module
    docstring). Use as a context manager (or call :meth:`close`); :meth:`update` advances it,
    :meth:`track` wraps an iterable. ``total=None``: no bar, only the title and ``done``."""

    def __init__(
        self, title: str, total: int | None = None, stream: IO[str] | None = None, terminal: bool | None = None
    ) -> None:
        self.title = title
        self.total = total if total and total > 0 else None
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.count = 0
        self.note = ""
        self.start = self._last_line = time.monotonic()
        self._last_draw = 0.0
        self._quarter = 0  # quarters already printed (log mode)
        self.closed = False
        if self.terminal:
            self._draw(force=True)
        else:
            self._write(f"{title}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        parts = [self.title]
        if self.total:
            done = min(self.count / self.total, 1.0)
            filled = int(round(done * BAR_WIDTH))
            parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * done:3.0f}%")
        parts.append(_seconds(now - self.start))
        if self.note:
            parts.append(self.note)
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would not redraw in place
        self._write("\r\033[K" + "  ".join(parts)[:width])

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Advance by ``n`` units; ``note`` (e.g. ``epoch 2/4``) is shown beside the bar."""
        if self.closed:
            return
        self.count += n
        if note is not None:
            self.note = note
        if self.terminal:
            self._draw()
            return
        if not self.total:
            return
        quarter = min(4, int(4 * self.count / self.total))
        now = time.monotonic()
        if 0 < quarter < 4 and quarter > self._quarter and now - self._last_line >= LOG_INTERVAL_S:
            self._quarter = quarter
            self._last_line = now
            note = f"  {self.note}" if self.note else ""
            self._write(f"    {100 * self.count / self.total:.0f}%  ({_seconds(now - self.start)}){note}\n")

    def add_total(self, n: int) -> None:
        """Add ``n`` units of work to the bar's total."""
        self.total = (self.total or 0) + n or None

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, advancing one unit per item."""
        for item in items:
            yield item
            self.update()

    def close(self) -> None:
        """End the line: ``done in ...`` (kept on the terminal)."""
        if self.closed:
            return
        self.closed = True
        took = _seconds(time.monotonic() - self.start)
        if self.terminal:
            self._write(f"\r\033[K{self.title}  done in {took}\n")
        else:
            self._write(f"    done in {took}\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        self.closed = True  # a failed stage: end the line and let the error speak
        if self.terminal:
            self._write("\n")


def render_table(lines: Sequence[Sequence[str]]) -> str:
    """Plain-text table: the first line is the header, every cell right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def titled(title: str, table: str) -> str:
    """``table`` after a blank line and ``title``: it stands out in a log."""
    return f"\n{title}\n{table}\n"


def print_table(title: str, table: str, stream: IO[str] | None = None) -> None:
    """Print :func:`titled` ``table``."""
    out = stream if stream is not None else sys.stdout
    out.write(titled(title, table))
    out.flush()


def trainer_progress(progress: Progress | None) -> dict[str, Any]:
    """Keyword arguments for ``pl.Trainer``: under ``--verbose`` Lightning's own progress bars;
    otherwise ``progress`` advanced by one unit per training or test/predict batch (training
    batches show ``epoch i/n``), or no bar at all when ``progress`` is None."""
    if is_verbose():
        return {"enable_progress_bar": True}
    if progress is None:
        return {"enable_progress_bar": False}
    return {"enable_progress_bar": True, "callbacks": [_lightning_bar_class()(progress)]}


def lightning_batches(trainer: Any, stage: str) -> int:
    """Batches a Lightning run will take (``stage``: fit, predict, test), 0 if unknown."""
    if stage == "fit":
        per_epoch = trainer.num_training_batches
        total = per_epoch * max(1, trainer.max_epochs or 1)
    else:
        counts = trainer.num_predict_batches if stage == "predict" else trainer.num_test_batches
        total = sum(counts)
    return int(total) if total != float("inf") else 0


_BAR_CLASS: list[type] = []


def _lightning_bar_class() -> type:
    """The Lightning callback behind :func:`trainer_progress` (Lightning imported on first use,
    so that CLIs without Lightning stay light)."""
    if _BAR_CLASS:
        return _BAR_CLASS[0]
    from pytorch_lightning.callbacks import ProgressBar

    class LightningProgress(ProgressBar):
        """Advances one :class:`Progress` per batch; its total is set when the run starts."""

        def __init__(self, progress: Progress) -> None:
            super().__init__()
            self.progress = progress
            self.enabled = True

        def disable(self) -> None:  # Lightning calls this on DDP ranks other than 0
            self.enabled = False

        def enable(self) -> None:
            self.enabled = True

        def _start(self, trainer: Any, stage: str) -> None:
            if self.enabled and self.progress.total is None:
                self.progress.total = lightning_batches(trainer, stage) or None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._start(trainer, "fit")

        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            self._start(trainer, "predict")

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._start(trainer, "test")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.enabled:
                loss = trainer.callback_metrics.get("train_loss_step", trainer.callback_metrics.get("loss_step"))
                note = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
                self.progress.update(1, note + (f"  loss {float(loss):.3f}" if loss is not None else ""))

        def on_predict_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            if self.enabled:
                self.progress.update(1)

        def on_test_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            if self.enabled:
                self.progress.update(1)

    _BAR_CLASS.append(LightningProgress)
    return LightningProgress
