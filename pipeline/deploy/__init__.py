"""Deployment: export a trained student to ONNX / torch.export and run the exported file.

``export.py`` needs the training stack (torch, timm, the student); ``runner.py`` needs only torch
for the shared pre/post-processing and onnxruntime (or torch.export's loader) for the network.
"""
