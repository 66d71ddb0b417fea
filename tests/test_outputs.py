"""Output paths are checked by trying, before any work: root passes os.access everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from superdiffusion.errors import InputError
from superdiffusion.outputs import check_output_dir, check_output_file, unwritable


def test_a_new_folder_is_checked_and_nothing_is_left_behind(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert check_output_dir(out) == out
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone again
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("k")
    check_output_dir(existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_a_folder_under_a_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub", afile / "sub" / "deeper"):
        with pytest.raises(InputError, match="afile") as exc:
            check_output_dir(out)
        assert "is a file" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="its folder"):
        check_output_file(afile / "report.html")
    assert afile.read_text() == "x"


def test_a_failing_write_is_refused_even_when_os_access_says_yes(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    assert "Permission denied" in unwritable(tmp_path / "new")
    with pytest.raises(InputError, match="Permission denied"):
        check_output_dir(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_folder_that_cannot_be_made_is_refused():
    with pytest.raises(InputError, match="cannot write"):
        check_output_dir("/proc/superdiffusion-no-such-dir/out")


def test_an_existing_file_is_never_overwritten(tmp_path):
    target = tmp_path / "x.html"
    target.write_text("mine")
    with pytest.raises(InputError, match="exists already"):
        check_output_file(target)
    assert target.read_text() == "mine"
    assert check_output_file(tmp_path / "new" / "y.html") == tmp_path / "new" / "y.html"
    assert not (tmp_path / "new").exists()
