"""Released checkpoints: config conversion, strict loading, and `dat-lab convert`."""

import argparse
import re
from pathlib import Path

import pytest
import torch
import yaml

import cli
import dat_lab
from conftest import load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("rpe_s2")


def test_config_from_official(golden):
    config = dat_lab.config_from_official(golden["config"])
    s2, s3 = config.stages[2], config.stages[3]
    assert (s2.letters, s2.groups, s2.offset_range, s2.position, s2.offset_kernel) == ("LDLD", 2, 2.0, "relative", 5)
    assert (s3.groups, s3.offset_kernel, config.num_classes, config.stem_dim) == (4, 3, 10, 0)
    assert config.stages[0].letters == "LS"
    released = {"dims": [96, 192, 384, 768], "depths": [2, 2, 6, 2], "heads": [3, 6, 12, 24],
                "stage_spec": [["L", "S"], ["L", "S"], ["L", "D"] * 3, ["L", "D"]], "groups": [-1, -1, 3, 6],
                "use_pes": [False, False, True, True], "offset_range_factor": [-1, -1, 2, 2], "drop_path_rate": 0.2}
    assert dat_lab.config_from_official(released) == dat_lab.get_config("dat_tiny")


def test_config_from_official_rejects_bad_input(golden):
    with pytest.raises(ValueError, match=r"unknown official key\(s\) \['use_lpu'\]"):
        dat_lab.config_from_official({**golden["config"], "use_lpu": [True] * 4})
    with pytest.raises(ValueError, match=r"^a DAT\+\+ config \(its keys \['use_lpus'\]\)"):  # the upstream repo's newer
        dat_lab.config_from_official({**golden["config"], "use_lpus": [True] * 4})  # configs (dat_tiny.yaml there)
    spec = [["L", "S"], ["L", "S"], ["L", "D", "L"], ["L", "D"]]
    with pytest.raises(ValueError, match=r"stage_spec\[2\]: 3 letters for depth 4"):
        dat_lab.config_from_official({**golden["config"], "stage_spec": spec})
    with pytest.raises(ValueError, match="groups: 3 values for 4 stages"):
        dat_lab.config_from_official({**golden["config"], "groups": [1, 2, 4]})


def test_load_official_is_strict(golden):
    model = dat_lab.create_model(dat_lab.config_from_official(golden["config"]))
    state = dict(golden["state_dict"])
    assert "stages.0.attns.1.attn_mask" in state  # derived buffers are dropped, not loaded
    dat_lab.load_official(model, {"model": state, "optimizer": {}, "epoch": 1})
    del state["cls_head.bias"]
    state["stages.9.extra"] = torch.zeros(1)
    state["stages.2.attns.1.rpe_table"] = torch.zeros(4, 29, 29)
    with pytest.raises(ValueError) as err:
        dat_lab.load_official(model, state)
    message = str(err.value)
    assert "missing ['cls_head.bias']" in message and "unexpected ['stages.9.extra']" in message
    assert "mis-shaped ['stages.2.attns.1.rpe_table (4, 29, 29) vs (4, 27, 27)']" in message


def test_convert_cli_round_trip(golden, golden_input, tmp_path):
    released = tmp_path / "released.pth"
    torch.save({"model": golden["state_dict"], "optimizer": {}, "lr_scheduler": {}, "epoch": 299}, released)
    official_yaml = tmp_path / "dat_small_random.yaml"
    official_yaml.write_text(yaml.safe_dump({"MODEL": {"TYPE": "dat", "DAT": golden["config"]}}))
    out = tmp_path / "new" / "folder" / "converted.ckpt"  # folders made as needed
    assert cli.main(["convert", str(released), "--official-config", str(official_yaml), "-o", str(out)]) == 0
    model = dat_lab.load_checkpoint(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden_input), golden["logits"], atol=1e-4, rtol=0)


def test_convert_cli_errors(golden, tmp_path, capsys):
    released = tmp_path / "released.pth"
    torch.save({"model": golden["state_dict"]}, released)
    assert cli.main(["convert", str(released), "--variant", "dat_tiny", "-o", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dat-lab: error: checkpoint does not fit the model: missing [") and err.count("\n") == 1
    assert " more; unexpected [" in err and len(err) < 1000  # another variant: the first names and a count
    assert cli.main(["convert", str(released), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert "exactly one of --variant" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "nope.pth"), "--variant", "dat_tiny", "-o", str(tmp_path / "x.ckpt")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: {tmp_path / 'nope.pth'}: no such checkpoint\n"
    assert cli.main(["convert", str(released), "--official-config", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: --official-config: {tmp_path / 'none.yaml'}: no such file or directory\n"
    (tmp_path / "bad.yaml").write_text("MODEL: [")
    assert cli.main(["convert", str(released), "--official-config", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert f"--official-config: {tmp_path / 'bad.yaml'} is not valid YAML (expected the node content, but found '<stream end>' at line 1, column 9)" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("MODEL: 3")
    assert cli.main(["convert", str(released), "--official-config", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert "holds no MODEL.DAT keywords" in capsys.readouterr().err
    for body, message in (({"dims": 8, "depths": [1], "heads": [1], "stage_spec": [["L"]]},
                           "dims: 8 is not a list (one value per stage)"),
                          ({"dims": [8], "depths": [1], "heads": [1], "stage_spec": [["L"]], "groups": []},
                           "groups: 0 values for 1 stages"),
                          ({"dims": [8], "nat_ksizes": [3]}, "a DAT++ config (its keys ['nat_ksizes']): dat-lab builds "
                           "DAT (CVPR 2022), the released code's dat.py configs, not DAT++")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"MODEL": {"DAT": body}}))
        assert cli.main(["convert", str(released), "--official-config", str(tmp_path / "bad.yaml"), "-o",
                         str(tmp_path / "x.ckpt")]) == 2
        assert capsys.readouterr().err == f"dat-lab: error: {message}\n"
    assert cli.main(["convert", str(released), "--official-config", str(released), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert f"--official-config: {released} is not a text file" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pth")
    assert cli.main(["convert", str(tmp_path / "list.pth"), "--variant", "dat_tiny", "-o", str(tmp_path / "x.ckpt")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: {tmp_path / 'list.pth'}: holds a list, not a checkpoint (a dict of weights)\n"
    assert cli.main(["convert", str(released), "--variant", "dat_tiny", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: -o: {tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'dat.ckpt'}\n"
    out = tmp_path / "list.pth" / "x.ckpt"  # refused before the conversion
    assert cli.main(["convert", str(released), "--variant", "dat_tiny", "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: -o: {out}: {tmp_path / 'list.pth'} is a file, not a folder\n"
    assert cli.main(["convert", str(tmp_path), "--variant", "dat_tiny", "-o", str(tmp_path / "x.ckpt")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: {tmp_path}: a folder, not a checkpoint file\n"
    torch.save({"model": golden["state_dict"], "config": argparse.Namespace(lr=1)}, tmp_path / "trained.pth")  # as the
    assert cli.main(["convert", str(tmp_path / "trained.pth"), "--variant", "dat_tiny", "-o", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err  # released training code saves its (yacs) config beside the weights
    assert "(GLOBAL argparse.Namespace was not an allowed global by default: objects besides weights" in err
    assert "torch.save(torch.load(FILE, weights_only=False)['model'], 'weights.pth'))\n" in err and err.count("\n") == 1
    assert not (tmp_path / "x.ckpt").exists()
    before = released.read_bytes()
    assert cli.main(["convert", str(released), "--variant", "dat_tiny", "-o", str(released)]) == 2  # over its input
    assert capsys.readouterr().err == f"dat-lab: error: -o: {released} is the checkpoint being converted; give another " \
        "file (it would be replaced, and a converted one is not converted again)\n"
    assert released.read_bytes() == before
    with pytest.raises(ValueError, match=f"^{re.escape(str(released))}: carries no model_config"):  # named, as
        dat_lab.load_checkpoint(released)  # by --model.weights and visualize, which read it so


def test_convert_names_a_dat_lab_checkpoint_in_one_line(tmp_path, capsys):
    model = dat_lab.create_model("dat_pico", num_classes=3, img_size=32)
    own, lightning = tmp_path / "own.ckpt", tmp_path / "last.ckpt"
    dat_lab.save_checkpoint(model, own)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": model.config.to_dict()}}, lightning)  # as Lightning saves
    for path in (own, lightning):
        assert cli.main(["convert", str(path), "--variant", "dat_pico", "-o", str(tmp_path / "x.ckpt")]) == 2
        assert capsys.readouterr().err == (f"dat-lab: error: {path}: a dat-lab checkpoint already (it carries its "
                                           "model config): load_checkpoint and `dat-lab visualize` read it as it is; "
                                           "convert takes the released code's checkpoints\n")
        dat_lab.load_checkpoint(path)
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize("content", [b"trainer: {max_epochs: 3}\n", bytes(range(256))], ids=["yaml", "bytes"])
def test_a_file_that_is_no_checkpoint_is_named_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: not a checkpoint that torch.load\\(weights_only=True\\) reads$"):
        dat_lab.load_checkpoint(path)
    assert cli.main(["visualize", str(path), "--data", "synthetic", "--count", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"dat-lab: error: {path}: not a checkpoint that torch.load(weights_only=True) reads\n"


def test_convert_a_fine_tuned_head_with_num_classes(golden, golden_input, tmp_path, capsys):
    state = dict(golden["state_dict"])  # a head of 10 classes, as its config says
    state["cls_head.weight"], state["cls_head.bias"] = torch.randn(7, state["cls_head.weight"].shape[1]), torch.randn(7)
    released, official_yaml, out = tmp_path / "tuned.pth", tmp_path / "dat.yaml", tmp_path / "tuned.ckpt"
    torch.save({"model": state}, released)
    official_yaml.write_text(yaml.safe_dump({"MODEL": {"TYPE": "dat", "DAT": golden["config"]}}))
    argv = ["convert", str(released), "--official-config", str(official_yaml), "-o", str(out)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.endswith("(its head has 7 classes: give num_classes=7, or `dat-lab convert --num-classes 7`)\n")
    assert cli.main([*argv, "--num-classes", "7"]) == 0
    tuned = dat_lab.load_checkpoint(out).eval()
    assert torch.equal(tuned.cls_head.weight, state["cls_head.weight"]) and torch.equal(tuned.cls_head.bias, state["cls_head.bias"])
    with torch.no_grad():
        assert tuned(golden_input).shape == (len(golden_input), 7)
    assert cli.main([*argv, "--num-classes", "0"]) == 0  # no head: features only
    with torch.no_grad():
        assert dat_lab.load_checkpoint(out).eval()(golden_input).shape == (len(golden_input), state["cls_head.weight"].shape[1])


def test_convert_that_cannot_write_is_one_line_and_leaves_an_earlier_output(golden, tmp_path, capsys, monkeypatch):
    released, out = tmp_path / "released.pth", tmp_path / "dat.ckpt"
    torch.save({"model": golden["state_dict"]}, released)
    out.write_bytes(b"an earlier conversion")

    def failing(model, path, **extra):  # as torch.save fails on a name it cannot write (a RuntimeError)
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:720] . invalid file name\nmore")

    monkeypatch.setattr(dat_lab, "save_checkpoint", failing)
    argv = ["convert", str(released), "--official-config", str(tmp_path / "c.yaml"), "-o", str(out)]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"MODEL": {"TYPE": "dat", "DAT": golden["config"]}}))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"dat-lab: error: -o: cannot write {out} ([enforce fail at inline_container.cc:720] "
                                       ". invalid file name)\n")
    assert out.read_bytes() == b"an earlier conversion" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["c.yaml", "dat.ckpt", "released.pth"]  # no partial file left
