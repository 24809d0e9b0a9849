"""What a run shows on a terminal: one overall progress bar, ``--quiet``/``--verbose``, an end summary.

On a terminal a run shows one tqdm bar on stderr for the whole run, with the current stage name
and an ETA; the bar never goes backwards, because each stage owns a fixed share of it (its
*weight*, roughly its share of the run time on a typical knee scan) and a stage's own fraction
only moves inside that share. When stdout is not a terminal (the Slicer module, ``batch``, a
pipe) or with ``--json-progress``, the JSON lines of :class:`~KneeSegLogic.io.outputs.Progress`
go to stdout instead, unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any, Callable, Mapping, TextIO

from KneeSegLogic.io.outputs import Progress

#: Share of a ``segment`` / ``demo`` run per stage (normalised over the stages that run).
SEGMENT_STAGES: dict[str, float] = {
    "read": 2,
    "inference": 45,
    "fusion": 10,
    "postprocessing": 8,
    "write": 7,
    "surfaces": 10,
    "t2": 10,
    "report": 8,
}

#: Share of a ``t2`` run per stage.
T2_STAGES: dict[str, float] = {"read": 5, "t2_fit": 70, "t2_write": 10, "t2_regions": 15}

#: Stages that run inside another one: (parent, first, last) fraction of the parent they cover.
SUBSTAGES: dict[str, tuple[str, float, float]] = {
    "t2_fit": ("t2", 0.0, 0.7),
    "t2_write": ("t2", 0.7, 0.8),
    "t2_regions": ("t2", 0.8, 1.0),
}

BAR_UNITS = 1000

#: Stages whose messages are shown even without ``--verbose`` (one-line notices).
NOTICE_STAGES = ("device",)


class TerminalProgress(Progress):
    """One overall tqdm bar on ``stream`` (stderr) for a run made of the weighted ``stages``.

    ``verbose`` also prints every stage's messages above the bar. Cancellation works as in
    :class:`Progress`. A stage not in ``stages`` (nor a known sub-stage of one) is shown by name
    and moves nothing.
    """

    def __init__(
        self,
        stages: Mapping[str, float],
        stream: TextIO | None = None,
        verbose: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        from tqdm import tqdm

        super().__init__(stream=None, cancel=cancel)
        total = float(sum(stages.values()))
        self.starts: dict[str, float] = {}
        self.shares: dict[str, float] = {}
        position = 0.0
        for name, weight in stages.items():
            self.starts[name], self.shares[name] = position / total, weight / total
            position += weight
        self.verbose = verbose
        self.done = 0.0
        self.bar = tqdm(
            total=BAR_UNITS,
            file=stream or sys.stderr,
            bar_format="{desc:<28.28} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
            # A terminal that reports no width (some CI ptys) gets shutil's fallback of 80.
            ncols=min(shutil.get_terminal_size().columns, 100),
        )

    def overall(self, stage: str, fraction: float) -> float | None:
        """Fraction of the whole run reached when ``stage`` is at ``fraction`` (None: unknown stage)."""
        if stage in SUBSTAGES and SUBSTAGES[stage][0] in self.starts:
            parent, first, last = SUBSTAGES[stage]
            stage, fraction = parent, first + (last - first) * fraction
        if stage == "done":
            return 1.0
        if stage not in self.starts:
            return None
        return self.starts[stage] + self.shares[stage] * min(max(fraction, 0.0), 1.0)

    def __call__(self, stage: str, progress: float, message: str = "") -> None:
        super().__call__(stage, progress, message)  # cancellation
        reached = self.overall(stage, progress)
        if reached is not None and reached > self.done:
            self.bar.update(int(round(reached * BAR_UNITS)) - self.bar.n)
            self.done = reached
        if stage != "done":
            self.bar.set_description_str(stage.replace("_", " "), refresh=False)
        if stage in NOTICE_STAGES or (self.verbose and stage != "done" and message not in ("", "started", "done")):
            self.bar.write(f"{stage}: {message}", file=self.bar.fp)
        self.bar.refresh()
        if stage == "done":
            self.close()

    def close(self) -> None:
        self.bar.close()


def make_progress(args: argparse.Namespace, stages: Mapping[str, float]) -> Progress:
    """The progress reporter a command's options ask for (see the module docstring)."""
    if getattr(args, "quiet", False):
        return Progress(stream=None)
    if getattr(args, "json_progress", False) or not sys.stdout.isatty():
        return Progress()
    return TerminalProgress(stages, verbose=getattr(args, "verbose", False))


def finish(args: argparse.Namespace, progress: Progress, data: Mapping[str, Any], out: Any) -> None:
    """After a successful run: close the bar and print the end summary (not with --quiet or JSON)."""
    if isinstance(progress, TerminalProgress):
        progress.close()
        print("\n".join(summary_lines(data, out, verbose=getattr(args, "verbose", False))))


def summary_lines(data: Mapping[str, Any], out: Any, verbose: bool = False) -> list[str]:
    """A short human summary of a run's ``results.json`` data: structures and volumes, T2, where."""
    from KneeSegLogic.tissues import BY_KEY

    lines: list[str] = []
    volumes: Mapping[str, float] = data.get("volumes_mm3") or {}
    if volumes:
        lines.append(f"{'structure':<26} {'volume (mL)':>11}")
        for key, mm3 in volumes.items():
            name = BY_KEY[key].name if key in BY_KEY else key
            lines.append(f"{name:<26} {mm3 / 1000:>11.2f}")
    plates = [
        r for r in ((data.get("t2") or {}).get("cartilage") or {}).get("regions", []) if r.get("level") == "plate"
    ]
    for row in plates:
        median = row.get("t2_median_ms")
        if isinstance(median, (int, float)):
            lines.append(f"T2 {row.get('name')}: median {median:.1f} ms")
    for warning in data.get("warnings", []):
        lines.append(f"warning: {warning}")
    if verbose:
        timings: Mapping[str, float] = data.get("timings_s", {})
        lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    lines.append(f"results in {out}" + ("  (open report.html)" if volumes else ""))
    return lines
