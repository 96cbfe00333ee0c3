"""Output folders and files are checked before the work, in one line naming the option."""

import pytest

import cli
from dat_lab.outputs import check_output_file, check_output_folder, make_folder


def test_output_folders_and_files(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert check_output_folder(tmp_path / "new" / "deeper", option="--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not made
    with pytest.raises(ValueError, match=f"^--out: {tmp_path / 'afile'} is a file, not a folder$"):
        check_output_folder(tmp_path / "afile", option="--out")
    with pytest.raises(ValueError, match=f"^--out: {tmp_path / 'afile' / 'x'}: {tmp_path / 'afile'} is a file, not a folder$"):
        check_output_folder(tmp_path / "afile" / "x", option="--out")
    with pytest.raises(ValueError, match=f"^-o: {tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'a.ckpt'}$"):
        check_output_file(tmp_path, option="-o", example="a.ckpt")
    with pytest.raises(ValueError, match=f"^-o: {tmp_path / 'new'} is a folder; give the file to write, e.g. "):
        check_output_file(f"{tmp_path / 'new'}/", option="-o", example="a.ckpt")  # a folder to be: torch.save failed
    with pytest.raises(ValueError, match=f"^-o: {tmp_path / 'afile' / 'x.ckpt'}: {tmp_path / 'afile'} is a file"):
        check_output_file(tmp_path / "afile" / "x.ckpt", option="-o", example="a.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]  # the checks' probes left nothing
    with pytest.raises(ValueError, match="^--out: /proc/dat-lab: /proc is not writable$"):
        check_output_folder("/proc/dat-lab", option="--out")  # (os.access says yes to root there)

    def read_only(prefix, dir):  # as a user's read-only folder (root writes anywhere else)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("dat_lab.outputs.tempfile.mkdtemp", read_only)
    with pytest.raises(ValueError, match=f"^--out: {tmp_path / 'new'}: {tmp_path} is not writable$"):
        check_output_folder(tmp_path / "new", option="--out")
    monkeypatch.undo()
    assert make_folder(tmp_path / "made" / "here", option="--out").is_dir()
    with pytest.raises(ValueError, match=f"^--out: cannot make {tmp_path / 'afile' / 'x'} \\("):
        make_folder(tmp_path / "afile" / "x", option="--out")


@pytest.mark.parametrize("argv", [["analyze", "demo"], ["visualize", "nosuch.ckpt"]])
def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("")
    if argv[0] == "analyze":  # a storage named: checked after --out (no default one: refused before anything)
        argv = [*argv, "--storage", f"sqlite:///{tmp_path / 'none.db'}"]
    if argv[0] == "visualize":
        argv = ["visualize", str(tmp_path / "afile")]  # a file where the checkpoint is looked for first
    assert cli.main([*argv, "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == f"dat-lab: error: --out: {tmp_path / 'afile'} is a file, not a folder\n"
