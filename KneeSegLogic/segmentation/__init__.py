"""Segmentation: from a scan to labels and uncertainty with a model package.

The package contract and registry (:mod:`.package`, :mod:`.registry`), networks, intensity
normalisation, inference and ensemble fusion, decision offsets (:mod:`.calibration`), entropy
maps (:mod:`.uncertainty`) and post-processing. Depends on :mod:`KneeSegLogic.io`.
"""
