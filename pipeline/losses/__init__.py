"""Task and distillation losses as small pure functions plus the set criterion.

Import the submodules directly, e.g. ``from pipeline.losses.criterion import SetCriterion``.
"""
