"""Ablation sweeps on Optuna: spec parsing and validation, planning, workers (status: dat_lab.analysis)."""

from .plan import plan
from .runner import open_study, work
from .spec import SpecError, SweepSpec, parse_spec

__all__ = ["SpecError", "SweepSpec", "open_study", "parse_spec", "plan", "work"]
