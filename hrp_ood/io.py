"""File I/O shared by every command: atomic writes (a kill at any moment leaves either the old file or the
new one, never a torn one), reading users' text files, and checking output paths before any work is done.

Every failure of the operating system (full disk, read-only folder, a file where a folder should be) becomes
a one-line UserError naming the path and the errno.
"""

from __future__ import annotations

import codecs
import csv
import errno
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hrp_ood.errors import UserError, cut, os_error_text, shown

# Byte-order marks a text file may start with, longest first (UTF-32-LE's starts with UTF-16-LE's).
_TEXT_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def write_error(path: str | Path, err: OSError) -> UserError:
    """The one-line error for an output that could not be written, with what to do about it."""
    if err.errno in _NO_SPACE:
        hint = "free some space or choose another output folder"
    elif err.errno in _NOT_ALLOWED:
        hint = "the folder is read-only for you: choose a writable one"
    elif err.errno in _NOT_A_FOLDER:
        hint = "a file stands where a folder is needed (or the reverse): choose another path"
    else:
        hint = "check the path and the disk"
    return UserError(f"cannot write {shown(path)}: {os_error_text(err)}; {hint}")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask alone must set one to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The file gets the permissions the umask gives any new file (not mkstemp's 0600). On failure the temporary
    file is removed and `path` keeps its old content; an OSError becomes a UserError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a file the user gave (a config, an image list): UTF-8, or UTF-8/16/32 with a byte-order mark.

    A binary file, another encoding or an unreadable file is a UserError naming `what` and the path.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {shown(path)}: {os_error_text(err)}") from None
    codec = next((name for bom, name in _TEXT_BOMS if data.startswith(bom)), None)
    if codec is None and b"\x00" in data:
        raise UserError(f"{what} {shown(path)} is a binary file, not text; give a UTF-8 text file")
    try:
        return data.decode(codec or "utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} {shown(path)} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None


def check_output_folder(path: str | Path, option: str) -> None:
    """Fail before any work when `path` cannot become the folder an output goes to: a file on the way, or
    no permission to write in the nearest folder that exists. Creates nothing."""
    _check_writable(Path(path), option, Path(path))


def check_output_file(path: str | Path, option: str) -> None:
    """As `check_output_folder`, for a file to be written: it must not be a folder, its folder must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {shown(path)} is a folder; give the path of a file to write")
    _check_writable(path.parent, option, path)


def _check_writable(folder: Path, option: str, given: Path) -> None:
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise UserError(f"{option} {shown(given)}: {shown(existing)} is a file, not a folder; choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(
            f"{option} {shown(given)}: cannot write in {shown(existing)} ({os_error_text(err)}); "
            f"choose a writable folder for {option}"
        ) from None


def read_metrics_rows(path: str | Path) -> list[dict[str, str]]:
    """A run's metrics.csv as dicts keyed by its header ([] when the file does not exist), checked: UTF-8 text and a
    whole-number `epoch` in every row (a hand-edited file is one line naming the file and the line, not a traceback
    where an epoch is compared)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(
            f"{shown(path)} is not a readable CSV file ({err}); restore it or delete it, then rerun (the run's last.pt "
            "keeps its last row)"
        ) from None
    if rows and "epoch" not in rows[0]:
        raise UserError(
            f"{shown(path)} has no epoch column: it is not a metrics.csv written by `hrp-ood train`; restore it"
        )
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        epoch = (row.get("epoch") or "").strip()
        if not (epoch.isascii() and epoch.isdigit()):
            raise UserError(
                f"{shown(path)} line {line}: epoch {cut(row['epoch'])} is not a whole number; fix or delete that line"
            )
    return rows


def csv_number(row: dict[str, str], key: str) -> float:
    """A numeric cell of `read_metrics_rows`; NaN where the column is missing, empty (does not apply) or not numeric."""
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan
