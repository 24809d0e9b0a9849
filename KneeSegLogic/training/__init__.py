"""Training: test phantoms (:mod:`.phantom`), random-contrast synthesis from real anatomy
(:mod:`.synthesis`), training data (:mod:`.data`), losses, the member trainer, held-out scans and
the package builder (:mod:`.builder`: calibration, evaluation, model card). Uses
:mod:`KneeSegLogic.segmentation` to run what it trains.
"""
