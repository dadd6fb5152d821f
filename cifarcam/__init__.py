"""cifarcam: train a ResNet on CIFAR-10, plot its curves, find its mistakes and explain them."""

__version__ = "0.1.0"
