"""Training with Lightning: the LightningModule, callbacks and the LightningCLI wiring."""

from .callbacks import DeformableMonitor, HparamsMetric, Throughput
from .module import ImageClassifier, NonFiniteLossError

__all__ = ["DeformableMonitor", "HparamsMetric", "ImageClassifier", "NonFiniteLossError", "Throughput"]
