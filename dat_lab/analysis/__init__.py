"""Analysis of studies: tables (pandas), plots (seaborn), report; and offset pictures of a checkpoint.
Reads what runs wrote (Optuna storage, TensorBoard events, checkpoints); never trains."""

from .study import AnalysisError

__all__ = ["AnalysisError", "Report", "analyze"]


def __getattr__(name: str):
    """Report and analyze on first use: `sweep-status` and `visualize`, which need only the study
    reader or the checkpoint, then never import matplotlib, seaborn and the plots."""
    if name in ("Report", "analyze"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
