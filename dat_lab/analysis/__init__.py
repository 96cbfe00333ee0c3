"""Analysis of studies: tables (pandas), plots (seaborn), report; and offset pictures of a checkpoint.
Reads what runs wrote (Optuna storage, TensorBoard events, checkpoints); never trains."""

from .report import Report, analyze
from .study import AnalysisError

__all__ = ["AnalysisError", "Report", "analyze"]
