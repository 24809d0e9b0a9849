"""Slicer-free helpers of the KneeSeg module: engine command lines, progress lines, process trees, results.

Nothing here imports ``slicer``, ``qt``, ``vtk`` or the engine (``engine.ENGINE_PACKAGE``): the module
talks to the engine only through its command line and its output folder, and these helpers are
unit-tested outside Slicer (``Testing/slicer/test_slicer_module.py``).
"""
