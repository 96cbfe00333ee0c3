"""Training with Lightning: the LightningModule, callbacks and the LightningCLI wiring."""

from .callbacks import DeformableMonitor, HparamsMetric, MetricTracker, Throughput
from .module import ImageClassifier, NonFiniteLossError

__all__ = ["DeformableMonitor", "HparamsMetric", "ImageClassifier", "MetricTracker", "NonFiniteLossError", "Throughput"]
