"""``kneeseg batch``: the segment job over a cohort, resumable, on Dask distributed.

Cases come from a folder (each NRRD/NIfTI/MHA file and each DICOM sub-folder is one case; the
case id is the file name without its image suffix, or the folder name) or from a CSV with
columns ``case_id,path[,echo_times]`` (relative paths are read from the CSV's folder; echo
times in ms separated by ``;`` or ``,``, for 4D files whose headers lack them).

Each case runs :func:`KneeSegLogic.pipeline.run_segment` into ``OUT/<case_id>/``, which
:func:`~KneeSegLogic.outputs.output_folder` publishes atomically, so a case folder holding
``results.json`` is complete: a rerun skips it (``--overwrite`` redoes it) and retries the
cases that failed. One failing case never stops the others; its error line is recorded. The
progress lines of each case go to ``OUT/logs/<case_id>.jsonl``; the batch itself reports one
line per finished case::

    {"stage": "batch", "progress": 0.25, "message": "case knee01 ok in 41.2s"}

At the end ``OUT/summary.csv`` holds one row per case (status ``ok``/``failed``/``skipped``,
error, seconds spent in this run, volume in mm^3 and mean uncertainty per structure, mean T2 of
the femoral cartilage for multi-echo scans) and ``OUT/batch.json`` records the run.

Cases run on Dask distributed when it is installed (``pip install "KneeSegLogic[batch]"``):
``--scheduler tcp://host:8786`` sends them to an existing cluster, whose workers must have
KneeSeg installed and see the same paths (shared storage); otherwise a ``LocalCluster`` of
``--workers`` single-threaded worker processes runs them, so a case that crashes or runs out of
memory takes down a worker, not the batch. Without Dask the cases run one after another in this
process.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from KneeSegLogic.errors import CancelledError, InputError, KneeSegError, one_line
from KneeSegLogic.io.checks import parse_echo_times
from KneeSegLogic.io.outputs import (
    BATCH_FILE,
    BATCH_SUMMARY,
    RESULTS_FILE,
    Progress,
    Results,
    write_csv,
    write_json,
)
from KneeSegLogic.io.scans import IMAGE_SUFFIXES
from KneeSegLogic.tissues import TISSUES

LOG_FOLDER = "logs"

CANCELLED = "cancelled"

#: Seconds a cancelled batch waits for the cases running on workers to stop (they notice the stop
#: file at their next progress report) before it closes the cluster; within the CLI's grace period.
STOP_WAIT_S = 5.0

CSV_COLUMNS = ("case_id", "path")

# Names the batch itself writes into OUT, so no case may take them.
RESERVED_IDS = {BATCH_SUMMARY, BATCH_FILE, LOG_FOLDER}

INSTALL_HINT = 'pip install "KneeSegLogic[batch]"'


@dataclass(frozen=True)
class Case:
    """One scan of the cohort.

    Attributes
    ----------
    case_id : str
        Name of the case's output folder.
    path : str
        Absolute path of the scan file or DICOM folder.
    echo_times_ms : tuple of float, optional
        Echo times in ms for a 4D file whose header lacks them.
    """

    case_id: str
    path: str
    echo_times_ms: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to a case: ``status`` is ``ok``, ``failed``, ``skipped`` or ``cancelled``
    (the batch was stopped before the case ended; never written to ``summary.csv``)."""

    case_id: str
    status: str
    error: str = ""
    seconds: float | None = None


def read_cases(source: Path, exclude: Path | None = None) -> list[Case]:
    """The cases named by a folder of scans or by a CSV file.

    Parameters
    ----------
    source : Path
        Folder (scan files and DICOM sub-folders) or CSV (``case_id,path[,echo_times]``).
    exclude : Path, optional
        A folder never taken as a case (the batch output, when it lies inside ``source``).

    Raises
    ------
    InputError
        ``source`` missing or holding no case, a CSV without the required columns, a case id
        that is empty, repeated, reserved or not a plain folder name, echo times unreadable.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if source.is_dir():
        cases = _cases_in_folder(source, exclude)
    elif source.suffix.lower() == ".csv":
        cases = _cases_in_csv(source)
    else:
        raise InputError(source, "expected a folder of scans or a .csv file with columns case_id,path[,echo_times]")
    if not cases:
        raise InputError(
            source,
            f"no cases found (expected {', '.join(IMAGE_SUFFIXES)} files or DICOM sub-folders)"
            if source.is_dir()
            else "no cases found (the CSV has no rows)",
        )
    seen: set[str] = set()
    for case in cases:
        _check_case_id(case.case_id, source)
        if case.case_id in seen:
            raise InputError(
                source, f"case id {case.case_id!r} appears twice; case ids name output folders and must be unique"
            )
        seen.add(case.case_id)
    return cases


def _cases_in_folder(folder: Path, exclude: Path | None) -> list[Case]:
    excluded = None if exclude is None else exclude.resolve()
    cases = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.resolve() == excluded:
                continue
            cases.append(Case(entry.name, str(entry.resolve())))
        else:
            suffix = next((s for s in IMAGE_SUFFIXES if entry.name.lower().endswith(s)), None)
            if suffix is not None:
                cases.append(Case(entry.name[: -len(suffix)], str(entry.resolve())))
    return cases


def _csv_text(table: Path) -> str:
    """The text of a CSV as spreadsheets save it: UTF-8 (with or without BOM), UTF-16 with BOM
    ("Unicode text"), else Windows-1252 (Excel's "CSV" on Western-European Windows)."""
    data = table.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError(table, "is not valid UTF-16 text although it starts with a UTF-16 mark") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        raise InputError(table, "is neither UTF-8, UTF-16 nor Windows-1252 text; save the CSV as UTF-8") from None


def _cases_in_csv(table: Path) -> list[Case]:
    text = _csv_text(table)
    if "\x00" in text:
        raise InputError(table, "holds NUL characters; save the CSV as UTF-8 text")
    # Excel writes ";" between cells where "," is the decimal separator: take the header's.
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = ";" if header.count(";") > header.count(",") else ","
    with io.StringIO(text, newline="") as stream:
        reader = csv.DictReader(stream, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise InputError(
                table,
                f"CSV lacks column(s) {', '.join(missing)}; expected a header case_id,path[,echo_times] "
                f"(found: {', '.join(columns) or 'no header'})",
            )
        cases = []
        for row_number, raw in enumerate(reader, start=2):
            # Cells beyond the header come under the key None; missing cells are None.
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
            if not any(row.values()):
                continue
            if not row["path"]:
                raise InputError(table, f"row {row_number}: empty path")
            path = Path(row["path"]).expanduser()
            path = path if path.is_absolute() else table.parent / path
            echo_times = None
            if row.get("echo_times"):
                try:
                    echo_times = tuple(parse_echo_times(row["echo_times"]))
                except ValueError as error:
                    raise InputError(table, f"row {row_number}: {error}") from None
            cases.append(Case(row["case_id"], str(path.resolve()), echo_times))
    return cases


def _check_case_id(case_id: str, source: Path) -> None:
    if not case_id:
        raise InputError(source, "a case has an empty case_id")
    if case_id in (".", "..") or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise InputError(source, f"case id {case_id!r} is not a plain folder name")
    if case_id in RESERVED_IDS or case_id.endswith(".partial"):
        raise InputError(source, f"case id {case_id!r} is reserved for the batch's own files; rename the case")


def is_done(out_root: Path, case_id: str) -> bool:
    """Whether the case's output folder is complete (it holds ``results.json``)."""
    return (Path(out_root) / case_id / RESULTS_FILE).is_file()


@dataclass(frozen=True)
class BatchOptions:
    """How ``kneeseg batch`` runs: the segment options every case shares, and where cases run.

    ``scheduler`` is a Dask scheduler address (None: a local cluster of ``workers`` processes,
    or this process when Dask is not installed).
    """

    model: str | None = None
    device: str = "auto"
    surfaces: bool = True
    overwrite: bool = False
    scheduler: str | None = None
    workers: int = 1


def run_case(case: Case, out_root: str, options: BatchOptions, stop_file: str | None = None) -> CaseOutcome:
    """Segment one case into ``out_root/<case_id>/``; never raises for a failure of the case.

    Parameters
    ----------
    case : Case
        The scan.
    out_root : str
        The batch output folder (must exist; seen by the worker at this path).
    options : BatchOptions
        ``model``, ``device``, ``surfaces`` and ``overwrite`` as for ``kneeseg batch``.
    stop_file : str, optional
        A file whose appearance stops the case (checked at every progress report): the batch
        creates it when it is cancelled, so cases running in worker processes, local or remote,
        stop and remove their partial folder.

    Returns
    -------
    CaseOutcome
        ``ok`` with the seconds taken, ``failed`` with one error line, or ``cancelled`` when
        ``stop_file`` appeared (nothing of the case is left).

    Raises
    ------
    CancelledError
        SIGTERM/Ctrl-C in this process: the batch stops, the case is not a failure.
    """
    from KneeSegLogic.io.scans import read_volume
    from KneeSegLogic.pipeline.segment import SegmentOptions, segment_scan

    def stopped() -> bool:
        return stop_file is not None and os.path.exists(stop_file)

    if stopped():  # queued before the batch was cancelled: do not start
        return CaseOutcome(case.case_id, CANCELLED)
    out_root_path = Path(out_root)
    segment_options = SegmentOptions(
        model=options.model, device=options.device, surfaces=options.surfaces, overwrite=options.overwrite
    )
    log_path = out_root_path / LOG_FOLDER / f"{case.case_id}.jsonl"
    log_path.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    error = ""
    # The case's own progress lines would interleave with the batch's: they go to its log.
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        try:
            results = Results("segment")
            with results.stage("read"):
                volume = read_volume(case.path, case.echo_times_ms)
            segment_scan(
                volume,
                out_root_path / case.case_id,
                segment_options,
                scan_path=Path(case.path),
                results=results,
                progress=Progress(cancel=stopped),
            )
        except CancelledError:
            if not stopped():
                raise  # SIGTERM/Ctrl-C stops the batch, it is not a failure of this case
            Progress(stream=log)("batch", 1.0, "cancelled: the batch was stopped")
            return CaseOutcome(case.case_id, CANCELLED)
        except KneeSegError as failure:
            error = str(failure)
        except Exception as failure:
            error = f"internal error: {type(failure).__name__}: {failure}"
        if error:
            Progress(stream=log)("batch", 1.0, f"failed: {one_line(error)}")
    seconds = round(time.perf_counter() - start, 2)
    return CaseOutcome(case.case_id, "failed" if error else "ok", one_line(error), seconds)


def _load_distributed():
    """The ``dask.distributed`` module, or None when Dask is not installed."""
    try:
        from dask import distributed
    except ImportError:
        return None
    return distributed


@contextlib.contextmanager
def dask_runner(
    distributed, scheduler: str | None, workers: int
) -> Iterator[tuple[str, Callable[[list[Case], str, BatchOptions], Iterator[CaseOutcome]]]]:
    """Connect to ``scheduler`` or start a ``LocalCluster``; yield (description, run function).

    The run function submits every case and yields outcomes as they finish. A worker lost while
    running a case (killed, out of memory) makes that case ``failed``, not the batch. When the
    ``with`` block ends in an exception (SIGTERM, Ctrl-C), the cases still running are stopped
    through their stop file and given :data:`STOP_WAIT_S` to clean up before the cluster closes.
    """
    submitted: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if scheduler:
            try:
                client = stack.enter_context(distributed.Client(scheduler))
            except (OSError, TimeoutError) as error:
                raise KneeSegError(
                    f"--scheduler {scheduler}: cannot connect to the Dask scheduler ({one_line(str(error))})"
                ) from None
            described = f"Dask scheduler {scheduler}"
        else:
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # No dashboard; its HTTP server (health checks) on any free port, not 8787.
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            )
            stack.callback(_close_local_cluster, cluster)
            client = distributed.Client(cluster)
            stack.callback(client.close, timeout=CLOSE_TIMEOUT_S)  # first out: before the cluster
            described = f"Dask LocalCluster, {workers} worker process(es) x 1 thread"

        def run(cases: list[Case], out_root: str, options: BatchOptions) -> Iterator[CaseOutcome]:
            # Keys name the case (on the dashboard, and for whoever inspects the scheduler); the
            # random part keeps a rerun's tasks distinct from a previous run's.
            run_id = uuid.uuid4().hex[:8]
            stop_file = str(Path(out_root) / f".kneeseg-stop-{run_id}")
            futures = {
                client.submit(
                    run_case, case, out_root, options, stop_file, key=f"kneeseg-case-{case.case_id}-{run_id}"
                ): case
                for case in cases
            }
            submitted.update(futures=list(futures), stop_file=stop_file)
            for future in distributed.as_completed(futures):
                case = futures[future]
                try:
                    yield future.result()
                except CancelledError:
                    raise  # SIGTERM/Ctrl-C in this process stops the batch; no case failed
                except Exception as error:
                    yield CaseOutcome(case.case_id, "failed", one_line(f"worker lost: {type(error).__name__}: {error}"))

        try:
            yield described, run
        except BaseException:
            if submitted:
                _stop_cases(distributed, submitted["futures"], Path(submitted["stop_file"]))
            raise
        finally:
            if submitted:
                Path(submitted["stop_file"]).unlink(missing_ok=True)


def _stop_cases(distributed, futures: list[Any], stop_file: Path) -> None:
    """Stop the cases of a cancelled batch: each running case sees ``stop_file`` at its next
    progress report and removes its partial folder; queued ones return at once. Waits at most
    :data:`STOP_WAIT_S`, so that the cluster then closes with no task left running."""
    try:
        stop_file.touch()
        distributed.wait(futures, timeout=STOP_WAIT_S)
    except Exception:  # stopping is best effort (a timeout, a lost scheduler): the cancellation goes on
        pass


#: Seconds each local worker process is given to exit when the batch ends (Dask's own 4 s are
#: too short for a process that imported torch on a loaded machine: it is killed, with a warning).
CLOSE_TIMEOUT_S = 60.0


def _close_local_cluster(cluster: Any) -> None:
    """Close a ``LocalCluster``: its nannies stop their worker processes with
    :data:`CLOSE_TIMEOUT_S` to exit cleanly, then the cluster closes (nothing is left to kill)."""

    async def close_workers() -> None:
        await asyncio.gather(*(nanny.close(timeout=CLOSE_TIMEOUT_S) for nanny in list(cluster.workers.values())))

    try:
        cluster.sync(close_workers)
    finally:
        cluster.close(timeout=CLOSE_TIMEOUT_S)


def _run_in_process(cases: list[Case], out_root: str, options: BatchOptions) -> Iterator[CaseOutcome]:
    for case in cases:
        yield run_case(case, out_root, options)


def summary_columns() -> list[str]:
    """Columns of ``summary.csv``: the same for every cohort, empty where a value is absent."""
    return (
        ["case_id", "status", "error", "seconds"]
        + [f"{t.key}_volume_mm3" for t in TISSUES]
        + [f"{t.key}_uncertainty" for t in TISSUES]
        + ["femoral_cartilage_t2_mean_ms"]
    )


def summary_row(outcome: CaseOutcome, out_root: Path) -> dict[str, Any]:
    """One row of ``summary.csv``; measurements read from the case's ``results.json``."""
    row: dict[str, Any] = {
        "case_id": outcome.case_id,
        "status": outcome.status,
        "error": outcome.error,
        "seconds": "" if outcome.seconds is None else outcome.seconds,
    }
    results_path = Path(out_root) / outcome.case_id / RESULTS_FILE
    if outcome.status != "failed" and results_path.is_file():
        results = json.loads(results_path.read_text())
        for key, mm3 in results.get("volumes_mm3", {}).items():
            row[f"{key}_volume_mm3"] = mm3
        for key, value in results.get("uncertainty", {}).get("per_structure", {}).items():
            row[f"{key}_uncertainty"] = value
        femoral = (results.get("t2") or {}).get("per_structure", {}).get("femoral_cartilage", {})
        if femoral.get("t2_mean_ms") is not None:
            row["femoral_cartilage_t2_mean_ms"] = round(femoral["t2_mean_ms"], 4)
    return row


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """Write ``summary.csv`` atomically (temporary file beside it, then rename)."""
    write_csv(path, summary_columns(), rows)


def run_batch(cases_source: Path, out_root: Path, options: BatchOptions) -> Results:
    """``segment`` every case of ``cases_source`` into ``out_root/<case_id>/``; resumable.

    Cases already done are skipped (unless ``options.overwrite``), failed ones retried on a rerun.
    Writes ``summary.csv`` and ``batch.json``; raises :class:`KneeSegError` (exit 1) naming how
    many cases failed, after writing them.
    """
    out_root = Path(out_root).resolve()
    if out_root.exists() and not out_root.is_dir():
        raise KneeSegError(f"{out_root}: exists and is not a folder")
    workers, scheduler = options.workers, options.scheduler
    if workers < 1:
        raise KneeSegError(f"--workers {workers}: needs at least one worker")
    cases = read_cases(Path(cases_source), exclude=out_root)
    if options.model and Path(options.model).exists():
        options = replace(
            options, model=str(Path(options.model).resolve())
        )  # workers need not share our working folder
    if not scheduler:
        # Refuse a bad model or device once, here, not once per case; and pin the package found
        # now so every case uses the same one even if the model cache changes during the batch.
        from KneeSegLogic.device import select_device
        from KneeSegLogic.segmentation.registry import get_package

        options = replace(options, model=str(Path(get_package(options.model).path).resolve()))
        select_device(options.device)
    distributed = _load_distributed()
    if distributed is None and scheduler:
        raise KneeSegError(f"--scheduler needs Dask distributed, which is not installed: {INSTALL_HINT}")

    progress = Progress()
    results = Results("batch")
    results["cases_source"] = str(Path(cases_source).resolve())
    results["options"] = asdict(options)
    started = time.perf_counter()
    done = set() if options.overwrite else {c.case_id for c in cases if is_done(out_root, c.case_id)}
    todo = [c for c in cases if c.case_id not in done]
    outcomes: dict[str, CaseOutcome] = {i: CaseOutcome(i, "skipped") for i in (c.case_id for c in cases) if i in done}

    run: Callable[[list[Case], str, BatchOptions], Iterator[CaseOutcome]]
    with contextlib.ExitStack() as stack:
        if not todo:
            described, run = "nothing to run", _run_in_process
        elif distributed is None:
            described, run = "in this process, one case after another", _run_in_process
            progress(
                "batch",
                0.0,
                f"Dask is not installed ({INSTALL_HINT}): running the cases one after another "
                "in this process" + (f"; --workers {workers} ignored" if workers > 1 else ""),
            )
        else:
            described, run = stack.enter_context(dask_runner(distributed, scheduler, workers))
        results["executor"] = described
        out_root.mkdir(parents=True, exist_ok=True)
        progress(
            "batch",
            len(outcomes) / len(cases),
            f"{len(cases)} cases: {len(outcomes)} done already, {len(todo)} to run ({described})",
        )
        for outcome in outcomes.values():
            progress("batch", len(outcomes) / len(cases), f"case {outcome.case_id} skipped: {RESULTS_FILE} exists")
        for outcome in run(todo, str(out_root), options):
            outcomes[outcome.case_id] = outcome
            said = f"ok in {outcome.seconds:.1f}s" if outcome.status == "ok" else f"failed: {outcome.error}"
            progress("batch", len(outcomes) / len(cases), f"case {outcome.case_id} {said}")

    ordered = [outcomes[c.case_id] for c in cases]
    write_summary([summary_row(o, out_root) for o in ordered], out_root / BATCH_SUMMARY)
    counts = {status: sum(o.status == status for o in ordered) for status in ("ok", "failed", "skipped")}
    results["counts"] = counts
    results["cases"] = [{**asdict(o), "path": c.path} for o, c in zip(ordered, cases)]
    results.data["timings_s"]["total"] = round(time.perf_counter() - started, 4)
    write_json(results.data, out_root / BATCH_FILE)
    progress(
        "done",
        1.0,
        f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"summary in {out_root / BATCH_SUMMARY}",
    )
    if counts["failed"]:
        raise KneeSegError(
            f"{counts['failed']} of {len(cases)} cases failed (see {out_root / BATCH_SUMMARY}); "
            "rerun the same command to retry them"
        )
    return results
