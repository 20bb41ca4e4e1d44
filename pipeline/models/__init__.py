"""Pure-convolution RegSAM student (backbone, neck, head) and training-only distillation modules.

Import the submodules directly, e.g. ``from pipeline.models.student import build_student``.
"""
