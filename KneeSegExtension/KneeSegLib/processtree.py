"""Stop a child process and everything it started, without psutil.

``PythonSlicer`` is a launcher: it starts the real Python as its own child and does not pass
signals on, and the engine may start workers of its own. Killing the launcher alone would leave
the computation running, so Cancel stops the whole tree. ``slicer.util.launchConsoleProcess``
does not start the child in a process group of its own (it would be Slicer's group, which must
not be signalled), so on POSIX the tree is found from the parent links ``ps`` reports; on Windows
``taskkill /T`` walks the tree itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def processParents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process on this machine (POSIX ``ps``)."""
    output = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, check=True).stdout
    parents = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            parents[int(fields[0])] = int(fields[1])
    return parents


def descendants(pid: int, parents: dict[int, int]) -> list[int]:
    """Every process below ``pid`` in the tree given by ``parents``, parents before their children."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, queue = [], list(children.get(pid, []))
    while queue:
        current = queue.pop(0)
        if current in found or current == pid:
            continue
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # already gone, or reused by someone else's process since the scan


def killProcessTree(pid: int) -> None:
    """Kill ``pid`` and all its descendants.

    On POSIX the tree is first frozen (SIGSTOP, so nobody starts new children while it is being
    collected), collected again until no new process appears, then killed (SIGKILL).
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return
    try:
        tree = [pid] + descendants(pid, processParents())
        for _ in range(5):
            _signal(tree, signal.SIGSTOP)
            grown = [pid] + descendants(pid, processParents())
            if set(grown) <= set(tree):
                break
            tree = list(dict.fromkeys(tree + grown))
            time.sleep(0.05)
    except (OSError, subprocess.CalledProcessError):
        tree = [pid]  # no `ps`: the best left is the launcher itself
    _signal(tree, signal.SIGKILL)
