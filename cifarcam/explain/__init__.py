"""Explanations of a trained model: CAM methods, faithfulness, sanity checks and the gradcam command."""
