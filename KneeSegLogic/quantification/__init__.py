"""Quantification: what is measured from a segmentation and the scan.

T2 relaxometry (:mod:`.relaxometry`, :mod:`.t2maps`), the knee's anatomical frame and cartilage
subregions (:mod:`.knee_frame`, :mod:`.regions`), thickness and 2D projection maps
(:mod:`.thickness`, :mod:`.projection`), change over time (:mod:`.longitudinal`) and surface
models (:mod:`.surfaces`). Depends on :mod:`KneeSegLogic.io` and the tissue table only.
"""
