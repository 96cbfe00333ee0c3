from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden_input():
    return torch.load(FIXTURES / "input.pt", weights_only=True)


def load_golden(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)
