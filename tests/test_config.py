"""Bad configs fail when built, in well under a second, with one line naming the field."""

import dataclasses

import pytest
import torch

import dat_lab
from dat_lab.models import DATConfig, StageConfig

BAD = [
    ({"blocks": ["LS", "LS", "LX", "LD"]}, r"stages\[2\]\.blocks: 'X' is not one of L, S, D, P"),
    ({"groups": [1, 1, 5, 6]}, r"stages\[2\]\.groups: 5 offset groups do not divide 12 heads"),
    ({"heads": [3, 6, 7, 24]}, r"stages\[2\]\.heads: 7 heads do not divide dim 384"),
    ({"key_downsample": [1, 1, 15, 1]}, r"stages\[2\]\.key_downsample: 15 is larger than the 14x14 map of stage 2 \(allowed: 1\.\.14\)"),
    ({"key_downsample": [1, 1, 0, 1]}, r"stages\[2\]\.key_downsample: 0 must be >= 1"),
    ({"depth": [2, 2, 5, 2]}, r"stages\[2\]\.blocks: pattern 'LD' does not fill depth 5"),
    ({"groups": [1, 1, 3]}, r"groups: 3 values for 4 stages"),
    ({"position": "rope"}, r"stages\[0\]\.position: 'rope' is not one of none, relative"),
    ({"offset_range": "two"}, r"stages\[0\]\.offset_range: 'two' is not a finite number"),
    ({"offset_range": float("nan")}, r"offset_range: nan is not a finite number"),
    ({"offsets": "yes"}, r"offsets: 'yes' is not true or false"),
    ({"offset_range": "1e-4"}, r"offset_range: '1e-4' is not a finite number \(YAML reads 1e-4 as text: write 1.0e-4\)$"),
    ({"depth": 2.5}, r"depth: 2.5 is not an integer$"),
    ({"offset_range": "1e5"}, r"offset_range: '1e5' is not a finite number \(YAML reads 1e5 as text: write 1.0e\+5\)$"),
    ({"reference": "centre"}, r"reference: 'centre' is not one of released, aligned"),
    ({"mlp": "glu"}, r"mlp: 'glu' is not one of token, dwconv"),
    ({"offset_kernel": 4}, r"offset_kernel: 4 must be an odd number"),
    ({"drop_path_rate": 1.5}, r"drop_path_rate: 1.5 must be in \[0, 1\)"),
    ({"img_size": 8}, r"img_size: 8 leaves no pixels for stage 2"),
    ({"num_classes": -1}, r"num_classes: -1 must be >= 0"),
    ({"window_size": 7}, r"unknown config field\(s\) \['window_size'\] \(did you mean window\?\); allowed: .*window"),
    ({"zzz": 7}, r"unknown config field\(s\) \['zzz'\]; allowed: "),
    ({"blocks": ["P", "LS", "LD", "LD"], "sr_ratio": [64, 1, 1, 1]},
     r"stages\[0\]\.sr_ratio: 64 is larger than the 56x56 map of stage 0 \(allowed: 1\.\.56\)"),
    ({"stages": [{"dim": 8}]}, r"stages\[0\]: .*missing 2 required positional arguments: 'depth' and 'heads'"),
    ({"stages": [1]}, r"stages\[0\]: 1 is not a stage \(a mapping of StageConfig fields: dim, depth, heads,"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_fails_before_building_with_one_line(overrides, message, monkeypatch):
    monkeypatch.setattr(dat_lab.models.dat.DAT, "__init__", lambda self, **kw: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=message) as err:
        dat_lab.create_model("dat_tiny", **overrides)
    assert "\n" not in str(err.value)


def test_configs_are_frozen_and_replace_validates():
    config = dat_lab.get_config("dat_tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.img_size = 32
    with pytest.raises(ValueError, match="^groups: 5 offset groups do not divide 12 heads$"):
        dataclasses.replace(config.stages[2], groups=5)


def test_offset_groups_are_checked_where_d_blocks_use_them():
    assert dat_lab.get_config("dat_pico", groups=[4, 1, 2, 4]).stages[0].groups == 4  # stage 0 has no D block
    with pytest.raises(ValueError, match=r"stages\[2\]\.groups: 3 offset groups do not divide 4 heads"):
        dat_lab.get_config("dat_pico", groups=[1, 1, 3, 4])


def test_config_round_trips_through_a_dict():
    config = dat_lab.get_config("dat_tiny", position=["none", "none", "fixed", "dwconv"], offset_range=-1)
    assert DATConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown DATConfig field"):
        DATConfig.from_dict({**config.to_dict(), "depths": [2, 2, 6, 2]})


@pytest.mark.parametrize("change,message", [
    ({"window_size": 7}, r"stages\[1\]: unknown StageConfig field\(s\) \['window_size'\]; allowed: dim, depth"),
    ({"heads": None}, r"stages\[1\]: .*missing 1 required positional argument: 'heads'"),
    ({"heads": 5}, r"stages\[1\]\.heads: 5 heads do not divide dim 192"),
])
def test_a_bad_stage_in_a_dict_fails_in_one_line(change, message):
    """What a checkpoint of another version may hold: a ValueError (which the CLI reports in one line)."""
    data = dat_lab.get_config("dat_tiny").to_dict()
    stage = {k: v for k, v in {**data["stages"][1], **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message) as err:
        DATConfig.from_dict({**data, "stages": [data["stages"][0], stage, *data["stages"][2:]]})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="DATConfig: no stages given"):
        DATConfig.from_dict({"img_size": 32})


@pytest.mark.parametrize("patch_size", [2, 4])
def test_the_conv_stem_strides_by_the_patch_size(patch_size):
    """The released conv stem is Conv2d(3, C, 7, patch_size, 3); stage_sizes follows it."""
    model = dat_lab.create_model("dat_pico", conv_patches=True, patch_size=patch_size, num_classes=0)
    assert model.patch_proj[0].stride == (patch_size, patch_size)
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape[-2:] == model.config.stage_sizes()[-1] == (32 // patch_size // 8,) * 2


def test_stage_pattern_repeats():
    assert StageConfig(dim=8, depth=6, heads=2, blocks="LD").letters == "LDLDLD"
    assert dat_lab.get_config("dat_small").stages[2].letters == "LD" * 9


def test_variants_match_the_paper():
    counts = {name: sum(p.numel() for p in dat_lab.create_model(name).parameters()) / 1e6
              for name in ("dat_tiny", "dat_small", "dat_base")}
    assert counts["dat_tiny"] == pytest.approx(28.32, abs=0.01)
    assert counts["dat_small"] == pytest.approx(49.70, abs=0.01)
    assert counts["dat_base"] == pytest.approx(87.88, abs=0.01)
    base384 = dat_lab.get_config("dat_base_384")
    assert (base384.img_size, base384.stages[0].window, base384.drop_path_rate) == (384, 12, 0.5)
