"""Issue 11: files written atomically get the umask's permissions; a failed write is one line naming the path and
the errno and leaves the old file; users' text files are read in any encoding or refused by name."""

from __future__ import annotations

import codecs
import errno
import os
import stat
import tempfile

import pytest

from hrp_ood.errors import UserError, one_line, shown
from hrp_ood.io import atomic_write, atomic_write_text, check_output_file, check_output_folder, read_text_file


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_permissions_of_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_text(tmp_path / "new.txt", "x")
    (tmp_path / "plain.txt").write_text("x")  # what any other file written by the process gets
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_a_full_disk_is_one_line_naming_path_and_errno_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError) as info:
        atomic_write_text(target, "new")
    assert str(info.value).startswith(f"cannot write {target}: No space left on device (ENOSPC); free some space")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"], "the temporary file is removed"


def test_an_error_inside_the_writer_is_not_disguised(tmp_path):
    def broken(f):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_text_files_in_unicode_encodings_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "config.yaml"
    path.write_bytes("lr: 0.1  # über\n".encode(encoding))
    assert read_text_file(path, "config file") == "lr: 0.1  # über\n"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"lr: 0.1\x00\x01\x02", ["binary file", "UTF-8"]),
        ("lr: 0.1  # caf\u00e9\n".encode("latin-1"), ["not UTF-8 text", "0xe9 at offset 14", "save it as UTF-8"]),
    ],
)
def test_binary_or_other_encodings_are_refused_by_name(tmp_path, content, words):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_text_file(path, "config file")
    assert str(info.value).startswith(f"config file {path} ")
    assert all(word in str(info.value) for word in words), str(info.value)


def test_output_paths_that_are_files_or_read_only_fail_before_anything_is_created(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"--out .*afile/sub: .*afile is a file, not a folder"):
        check_output_folder(tmp_path / "afile" / "sub", "--out")
    with pytest.raises(UserError, match=r"--out .*afolder is a folder; give the path of a file"):
        (tmp_path / "afolder").mkdir()
        check_output_file(tmp_path / "afolder", "--out")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError, match=r"cannot write in .*\(Read-only file system \(EROFS\)\)"):
        check_output_folder(tmp_path / "new" / "deeper", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "afolder"]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("runs/a/last.pt", "runs/a/last.pt"),
        ("\ufeffruns/last.pt", "'\\ufeffruns/last.pt'"),
        ("runs/last.pt ", "'runs/last.pt '"),
        ("my runs/last.pt", "'my runs/last.pt'"),
        ("runs/\u200blast.pt", "'runs/\\u200blast.pt'"),
    ],
)
def test_paths_in_messages_show_invisible_characters_and_spaces(path, expected):
    assert shown(path) == expected


def test_a_message_prints_as_one_line_with_escapes():
    assert one_line("bad\nline\ufeff") == "bad\\nline\\ufeff"
    assert codecs.decode(one_line("x\u200by"), "unicode_escape") == "x\u200by"
