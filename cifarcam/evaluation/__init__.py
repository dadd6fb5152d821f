"""Scoring a trained run: inference, evaluate and misclassified, and predictions on any image."""
