"""The released CVPR-2022 code's outputs, reproduced through the public API."""

import pytest
import torch

import dat_lab
from conftest import load_golden

VARIANTS = ["rpe_s2", "nope_s2", "dwcpe_s2", "rpe_unbounded", "rpe_stride2", "rpe_s5_convpatch_dwcmlp"]


@pytest.mark.parametrize("name", VARIANTS)
def test_golden_fixture(name, golden_input):
    golden = load_golden(name)
    model = dat_lab.create_model(dat_lab.config_from_official(golden["config"])).eval()
    dat_lab.load_official(model, golden["state_dict"])
    with torch.no_grad():
        out = model.forward_intermediates(golden_input)
    torch.testing.assert_close(out["logits"], golden["logits"], atol=1e-4, rtol=0)

    expected = [(i, p, r) for i, (p, r) in enumerate(zip(golden["positions"], golden["references"])) if p is not None]
    blocks = list(out["deformable"].items())
    assert len(blocks) == len(expected)
    for (block, info), (_, pos, ref) in zip(blocks, expected):
        torch.testing.assert_close(info["positions"], pos, atol=1e-5, rtol=0, msg=block)
        torch.testing.assert_close(info["references"], ref, atol=1e-5, rtol=0, msg=block)


def test_golden_paths_matter(golden_input):
    """Zeroing the offsets moves the logits: the fixture test would catch a model ignoring them."""
    golden = load_golden("rpe_s2")
    model = dat_lab.create_model(dat_lab.config_from_official(golden["config"])).eval()
    dat_lab.load_official(model, golden["state_dict"])
    for name, p in model.named_parameters():
        if "conv_offset.3" in name:
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        logits = model(golden_input)
    assert (logits - golden["logits"]).abs().max() > 1e-2


def test_block_names_follow_the_released_order(golden_input):
    golden = load_golden("rpe_stride2")
    model = dat_lab.create_model(dat_lab.config_from_official(golden["config"])).eval()
    with torch.no_grad():
        names = list(model.forward_intermediates(golden_input[:1])["deformable"])
    assert names == ["stages.2.attns.1", "stages.2.attns.3", "stages.3.attns.1"]
