"""Exporting a trained run for use outside cifarcam: ONNX and a model card."""
