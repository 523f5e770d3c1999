"""One runner for per-file jobs: inputs, output naming, resume, failures, executors, interrupts.

A job is any picklable callable ``job(item) -> result`` that writes the item's outputs atomically
(:func:`phenoscope.core.io.atomic_write` / ``atomic_path``), so an item either has all its outputs or
is redone by the next run.

    files = collect_inputs(["images/", "more/*.tif"])            # refuses missing paths, same-stem pairs
    items = plan(files, out_dir, ("_masks.tif", "_cells.csv"))   # <out>/<stem><suffix>
    report = run_batch(items, job, executor=ProcessExecutor(4))  # skips items whose outputs all exist
    report.failed                                                # [(file, one-line problem), ...]

``run_batch`` turns Ctrl-C (SIGINT) and SIGTERM into :class:`BatchInterrupted`, which carries the
report of what was done (exit code 130 / 143 in the CLI). An :class:`Executor` runs the job over the
items and yields outcomes as they complete: :class:`SerialExecutor` in this process,
:class:`ProcessExecutor` on local processes, :class:`DaskExecutor` on a dask.distributed cluster
(a remote scheduler's address, or a LocalCluster it starts).
"""

from __future__ import annotations

import abc
import contextlib
import glob
import multiprocessing
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phenoscope.core.io import IMAGE_SUFFIXES

__all__ = [
    "BatchInterrupted",
    "BatchReport",
    "DaskExecutor",
    "Executor",
    "InputError",
    "check_writable",
    "error_line",
    "Item",
    "Outcome",
    "ProcessExecutor",
    "SerialExecutor",
    "collect_inputs",
    "make_executor",
    "plan",
    "run_batch",
]

class InputError(ValueError):
    """The input list cannot be processed as given (found before any work starts)."""


@dataclass(frozen=True)
class Item:
    """One unit of work: an input file and the files that, once all present, mark it done."""

    source: Path
    outputs: tuple[Path, ...]
    extra: Any = None  # per-item data the job needs (e.g. the label mask of an image)

    def done(self) -> bool:
        """True when every output exists (outputs are written atomically, so they are complete)."""
        return bool(self.outputs) and all(p.exists() for p in self.outputs)


@dataclass(frozen=True)
class Outcome:
    """What an executor yields per item: the job's result, or the one-line problem when it raised."""

    item: Item
    result: Any = None
    error: str | None = None


@dataclass
class BatchReport:
    """Per-item results of a run, in input order."""

    done: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    results: dict[Path, Any] = field(default_factory=dict)
    unfinished: list[Item] = field(default_factory=list)

    def summary(self, verb: str = "processed") -> str:
        """One line, e.g. ``segmented 3, skipped 1 (already done), failed 0``."""
        line = f"{verb} {len(self.done)}, skipped {len(self.skipped)} (already done), failed {len(self.failed)}"
        return line + (f", not done {len(self.unfinished)} (interrupted)" if self.unfinished else "")

    def failure_lines(self) -> list[str]:
        """``<file>: <problem>`` for every failed item (the problem names the file already if it did)."""
        return [msg if str(path) in msg else f"{path}: {msg}" for path, msg in self.failed]


class BatchInterrupted(KeyboardInterrupt):
    """Raised by :func:`run_batch` on SIGINT / SIGTERM; ``report`` holds what was done before."""

    def __init__(self, report: BatchReport, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.report, self.signum = report, signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def error_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def _call(job: Callable[[Item], Any], item: Item) -> Outcome:
    try:
        return Outcome(item, result=job(item))
    except Exception as err:  # one bad file must not stop the batch
        return Outcome(item, error=error_line(err))


class Executor(abc.ABC):
    """Runs a job over items, yielding an :class:`Outcome` per item as each completes (any order)."""

    @abc.abstractmethod
    def run(self, job: Callable[[Item], Any], items: Sequence[Item]) -> Generator[Outcome, None, None]:
        """Yield one outcome per item. On KeyboardInterrupt in the consumer, stop starting new items."""


class SerialExecutor(Executor):
    """Items one after another in this process (an interrupt stops the current item at once)."""

    def run(self, job: Callable[[Item], Any], items: Sequence[Item]) -> Generator[Outcome, None, None]:
        for item in items:
            yield _call(job, item)


_WORKER_JOB: Callable[[Item], Any] | None = None


def _init_worker(job: Callable[[Item], Any], initializer: Callable[[], None] | None) -> None:
    global _WORKER_JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; the current item finishes
    _WORKER_JOB = job
    if initializer is not None:
        initializer()


def _worker_call(item: Item) -> Outcome:
    assert _WORKER_JOB is not None
    return _call(_WORKER_JOB, item)


class ProcessExecutor(Executor):
    """``workers`` spawned processes; the job is sent once to each (e.g. a loaded model).

    On interrupt no new item starts and the items in progress finish (their outputs are complete).
    ``initializer`` runs once in every worker (e.g. to set the thread count).
    """

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.workers, self.initializer = workers, initializer

    def run(self, job: Callable[[Item], Any], items: Sequence[Item]) -> Generator[Outcome, None, None]:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(job, self.initializer))
        queue = iter(items)
        pending: set[Future] = set()

        def submit_next() -> None:
            item = next(queue, None)
            if item is not None:
                pending.add(pool.submit(_worker_call, item))

        try:
            for _ in range(2 * self.workers):  # a short queue: on interrupt, few items are in flight
                submit_next()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                pending.difference_update(finished)
                for future in finished:
                    submit_next()
                    yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _dask_call(job: Callable[[Item], Any], initializer: Callable[[], None] | None, item: Item) -> Outcome:
    if initializer is not None:
        initializer()
    return _call(job, item)


class DaskExecutor(Executor):
    """Items as tasks on a dask.distributed cluster: the scheduler at ``address`` (``tcp://host:8786``),
    or, with ``address=None``, a LocalCluster of ``workers`` single-threaded worker processes that lives
    as long as the run.

    The job is scattered once to every worker (a loaded model is not re-sent per item); ``initializer``
    runs before each item on the worker (it must be cheap and idempotent, e.g. setting the thread count).
    At most ``2 × workers`` items are in flight, so an interrupt leaves few running; those are cancelled.
    Raises :class:`InputError` when the scheduler cannot be reached.
    """

    def __init__(self, address: str | None = None, workers: int = 1, initializer: Callable[[], None] | None = None,
                 timeout: float = 10.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.address, self.workers, self.initializer, self.timeout = address, workers, initializer, timeout

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A connected ``distributed.Client`` (and the LocalCluster it started, closed on exit)."""
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("a dask cluster needs the 'distributed' package: pip install 'phenoscope[dask]'") from None
        if self.address is None:
            # one thread per worker for numba too (dask sets torch's and BLAS's; numba would use every core)
            with LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=40, env={"NUMBA_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
                yield client
            return
        try:
            client = Client(self.address, timeout=self.timeout)
        except (OSError, TimeoutError) as err:
            raise InputError(f"{self.address}: cannot reach the dask scheduler ({error_line(err)})") from None
        with client:
            yield client

    def run(self, job: Callable[[Item], Any], items: Sequence[Item]) -> Generator[Outcome, None, None]:
        from distributed import as_completed

        with self.client() as client:
            slots = 2 * max(self.workers, len(client.scheduler_info().get("workers", {})) or 1)
            shared = client.scatter(job, broadcast=True)
            queue = iter(items)
            running = as_completed()
            futures = []

            def submit_next() -> None:
                item = next(queue, None)
                if item is not None:
                    future = client.submit(_dask_call, shared, self.initializer, item, pure=False)
                    futures.append(future)
                    running.add(future)

            try:
                for _ in range(slots):
                    submit_next()
                for future in running:
                    submit_next()
                    yield future.result()
            finally:
                client.cancel(futures)


def make_executor(workers: int, initializer: Callable[[], None] | None = None, scheduler: str | None = None) -> Executor:
    """The executor for ``workers`` processes and an optional dask ``scheduler``: serial for ``workers`` ≤ 1,
    else a :class:`ProcessExecutor` of that many processes; with ``scheduler``, a :class:`DaskExecutor` on
    that address (``"local"``: a LocalCluster of ``workers`` processes). ``initializer`` runs in each worker."""
    if scheduler:
        return DaskExecutor(None if scheduler == "local" else scheduler, max(1, workers), initializer)
    return SerialExecutor() if workers <= 1 else ProcessExecutor(workers, initializer)


def collect_inputs(inputs: Iterable[str | Path], suffixes: Sequence[str] = IMAGE_SUFFIXES,
                   exclude: Sequence[str] = (), unique_stems: bool = True) -> list[Path]:
    """Expand files, folders (their files, not recursive) and glob patterns, in order, without repeats.

    Folders and globs give the files whose suffix is one of ``suffixes`` and whose name does not end
    with one of ``exclude`` (e.g. ``_masks.tif``: outputs kept beside the images); a file named
    explicitly is always taken. Raises :class:`InputError` naming every input that matched nothing
    and, with ``unique_stems``, every set of inputs sharing a file stem (their outputs would collide).
    """

    def wanted(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in suffixes and not p.name.endswith(tuple(exclude))

    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if wanted(p))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(p for p in map(Path, glob.glob(str(entry), recursive=True)) if wanted(p))
        if not found:
            problems.append(f"{entry}: no such file, or no images found")
        for f in found:
            if f not in seen:
                seen.add(f)
                files.append(f)
    if unique_stems:
        by_stem: dict[str, list[Path]] = {}
        for f in files:
            by_stem.setdefault(f.stem, []).append(f)
        problems += [f"{', '.join(map(str, group))}: share the name {stem!r}; their outputs would collide"
                     for stem, group in by_stem.items() if len(group) > 1]
    if problems:
        raise InputError("; ".join(problems))
    return files


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check a file can be written in it; raises :class:`InputError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"{folder}: output folder is not writable ({err.strerror or type(err).__name__})") from None
    return folder


def plan(files: Iterable[Path], out_dir: str | Path, suffixes: Sequence[str]) -> list[Item]:
    """Items with outputs ``<out_dir>/<stem><suffix>`` for each suffix."""
    out_dir = Path(out_dir)
    return [Item(Path(f), tuple(out_dir / f"{Path(f).stem}{s}" for s in suffixes)) for f in files]


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises like Ctrl-C does (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Signalled(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_batch(
    items: Sequence[Item],
    job: Callable[[Item], Any],
    executor: Executor | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    desc: str = "batch",
    on_done: Callable[[Item, Any], str | None] | None = None,
) -> BatchReport:
    """Run ``job`` on every item whose outputs are not all present (all of them with ``overwrite``).

    ``progress``: a tqdm bar (None: only on a terminal). ``on_done(item, result)`` may return a line
    to print for each finished item. Failures are collected (never raised); SIGINT / SIGTERM raise
    :class:`BatchInterrupted` carrying the report so far.
    """
    from tqdm.auto import tqdm

    executor = executor or SerialExecutor()
    report = BatchReport()
    todo = []
    for item in items:
        (todo if overwrite or not item.done() else report.skipped).append(item)
    finished: set[Path] = set()
    bar = tqdm(total=len(todo), desc=desc, unit="file", file=sys.stderr,
               disable=None if progress is None else not progress)
    outcomes = executor.run(job, todo)
    try:
        with _sigterm_raises(), contextlib.closing(outcomes):
            for outcome in outcomes:
                finished.add(outcome.item.source)
                if outcome.error is not None:
                    report.failed.append((outcome.item.source, outcome.error))
                else:
                    report.done.append(outcome.item)
                    report.results[outcome.item.source] = outcome.result
                    line = on_done(outcome.item, outcome.result) if on_done else None
                    if line:
                        bar.write(line, file=sys.stdout)
                bar.update()
    except KeyboardInterrupt as err:
        report.unfinished = [i for i in todo if i.source not in finished]
        _sort(report, items)
        raise BatchInterrupted(report, getattr(err, "signum", signal.SIGINT)) from None
    finally:
        bar.close()
    _sort(report, items)
    return report


def _sort(report: BatchReport, items: Sequence[Item]) -> None:
    order = {item.source: n for n, item in enumerate(items)}
    report.done.sort(key=lambda i: order[i.source])
    report.failed.sort(key=lambda f: order[f[0]])
