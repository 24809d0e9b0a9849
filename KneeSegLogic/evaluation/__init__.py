"""Evaluation: segmentation metrics against a reference (:mod:`.metrics`) and agreement of
measurements between methods or repeats (:mod:`.agreement`)."""
