"""What kind of scan an input node is: one volume, a multi-echo series, or a 4D series KneeSeg refuses.

Slicer holds a multi-echo scan in one of three ways: a vector volume (one component per echo,
e.g. a 4D NRRD), a multi-volume node (MultiVolumeImporter's older format; the frame labels hold
the echo times) or a volume *sequence* with a browser (MultiVolumeImporter's preferred format;
the index values hold the echo times and the proxy node shows one echo). A sequence or
multi-volume whose frames are not echoes (time points of a dynamic scan, b-values, ...) is a 4D
series: KneeSeg segments one 3D volume or one multi-echo series, so it says so instead of
segmenting one frame or fitting T2 to time points.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from .engine import parseEchoTimes

# Frame labels naming echo times: MultiVolumeImporter's "EchoTime", DICOM keyword "EchoTime" or tag
# (0018,0081), the short "TE".
_ECHO_INDEX = re.compile(r"echo|^te$|0018[|,]?0081", re.IGNORECASE)
_SECONDS = {"s", "sec", "second", "seconds"}


def isEchoIndex(indexName: str) -> bool:
    """True when a sequence index or frame label name says the frames are echoes."""
    return bool(_ECHO_INDEX.search((indexName or "").strip()))


def frameDescription(indexName: str, indexUnit: str, indexValues: Sequence[str], frameTag: str, frameTagUnit: str,
                     frameLabels: Sequence[str]) -> tuple[str, str, list[str]]:
    """(name, unit, values) that describe a sequence's frames.

    MultiVolumeImporter loads multi-echo DICOM as a sequence whose index is empty (frame numbers)
    and keeps the frames' DICOM tag, unit and values in ``MultiVolume.*`` attributes: those win
    when they describe every frame; otherwise the sequence's own index does.
    """
    if frameLabels and len(frameLabels) == len(indexValues):
        return frameTag, frameTagUnit, list(frameLabels)
    return indexName, indexUnit, list(indexValues)


def frameEchoTimes(nodeName: str, indexName: str, indexUnit: str, indexValues: Sequence[str],
                   typedEchoTimes: Sequence[float] = ()) -> list[float]:
    """Echo times (ms) of a series of ``len(indexValues)`` frames, or a ``ValueError`` saying why not.

    Echo times typed by the user win when their count matches the frames (a sequence whose index
    is unnamed but holds echoes). Otherwise the index must name echo times; values in seconds
    are converted to milliseconds.
    """
    count = len(indexValues)
    if typedEchoTimes:
        if len(typedEchoTimes) != count:
            raise ValueError(f"'{nodeName}' has {count} frames but {len(typedEchoTimes)} echo times were given")
        return list(typedEchoTimes)
    if not isEchoIndex(indexName):
        kind = f"{indexName or 'unnamed'}" + (f" ({indexUnit})" if indexUnit else "")
        raise ValueError(
            f"'{nodeName}' is a 4D series of {count} frames indexed by {kind}, not a multi-echo series. "
            "KneeSeg segments one 3D volume or one multi-echo series; it does not process 4D sequences "
            "frame by frame. Select a single volume (e.g. copy the current frame in the Sequences module), "
            "or type the echo times if the frames are echoes.")
    try:
        times = parseEchoTimes(",".join(str(value) for value in indexValues))
    except ValueError as error:
        raise ValueError(f"'{nodeName}': the echo times in its {indexName} index are not usable: {error}") from None
    if (indexUnit or "").strip().lower() in _SECONDS:
        times = [time * 1000.0 for time in times]
    if len(times) != count or not all(math.isfinite(t) for t in times):
        raise ValueError(f"'{nodeName}': {count} frames but {len(times)} echo times in its {indexName} index")
    return times


def echoMessage(nodeName: str, echoes: int, separateT2Series: bool, t2Requested: bool) -> str:
    """What the run does with T2 for an input of ``echoes`` echoes, in one sentence for the panel."""
    if echoes > 1:
        return f"'{nodeName}': {echoes} echoes" + (": the T2 map is fitted on them." if t2Requested and not separateT2Series else ".")
    text = f"'{nodeName}' has one echo"
    if not t2Requested:
        return text + "."
    if separateT2Series:
        return text + ": T2 is fitted on the chosen multi-echo series."
    return text + ": no T2 map (choose a multi-echo series for T2)."
