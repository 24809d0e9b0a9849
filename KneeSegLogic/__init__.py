"""KneeSegLogic: the engine of the KneeSeg 3D Slicer extension.

Pure Python (numpy, SimpleITK, torch, MONAI, VTK, scikit-image); it never imports
``slicer``, ``qt`` or ``ctk``. The Slicer module runs it as a subprocess and reads the
output folder it writes (see :mod:`KneeSegLogic.outputs`).
"""

__version__ = "0.1.0"
