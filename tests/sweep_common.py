"""What the sweep tests share: paths, a base spec, a search space, and writing a spec."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "sweeps" / "demo.yaml")
SMALL = ["budget.max_epochs=1", "budget.limit_train_batches=3", "budget.limit_val_batches=2"]
BASE = f"study: t\nbase: {ROOT / 'experiments' / 'digits_quick.yaml'}\n"
TPE = "sampler: tpe\nn_trials: 2\nsearch_space: {model.lr: {type: float, low: 1.0e-4, high: 1.0e-2}}\n"


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path
