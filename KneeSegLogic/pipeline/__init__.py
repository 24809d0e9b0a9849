"""Pipelines: whole jobs built from the layers below — ``segment`` on one scan
(:mod:`.segment`), its report (:mod:`.report`) and cohorts on Dask (:mod:`.batch`)."""
