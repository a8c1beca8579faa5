"""Deployment: a trained checkpoint as a predictor, exported to ONNX, and served over HTTP.

predictor.py rebuilds a model from a checkpoint (or loads an .onnx file) with its preprocessing;
onnx_export.py writes the ONNX graph (needs the '.[export]' extra); server.py is the HTTP classifier.
"""
from .predictor import OnnxPredictor, Predictor, decode_image

__all__ = ["Predictor", "OnnxPredictor", "decode_image"]
