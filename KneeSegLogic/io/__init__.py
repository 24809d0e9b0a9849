"""Input and output: the :class:`~KneeSegLogic.io.volume.Volume` type with its geometry, reading
and checking scans (:mod:`.scans`, :mod:`.checks`, :mod:`.dicom`), Slicer segmentation files
(:mod:`.segfile`) and the output folder contract (:mod:`.outputs`: file names, atomic writes,
results.json, progress lines). The bottom layer: imports nothing else of the engine but
:mod:`KneeSegLogic.errors` and :mod:`KneeSegLogic.tissues`.
"""
