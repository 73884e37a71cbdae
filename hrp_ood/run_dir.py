"""The run folder `<out_dir>/<name>/` of `hrp-ood train`: who may use it, and what starting a run may remove.

* A run name is one folder name: the run never lands outside `--out-dir`.
* One training process at a time: `claim` takes an exclusive `fcntl.flock` on `<run>/.lock` for the whole run
  (the kernel drops it when the process dies, even on SIGKILL); a second process fails with the holder's pid.
* Temporary files of atomic writes a crash interrupted (`.last.pt.*.tmp`, …) are removed at the next start.
* What a new start replaces — a run of ours under `--overwrite`, or a run that stopped before its first
  checkpoint — is recognised by its file names (RUN_FILES, eval_*/ and cache/ of `hrp-ood evaluate`), never a
  folder holding anything else. It is moved aside into `<run>/.replaced/` and deleted only once the new run has
  started (`keep`); if setting up the new run fails, it is put back (`abandon`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path

from hrp_ood.errors import UserError, cut, shown
from hrp_ood.io import check_output_folder, write_error

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
RUN_FILES = frozenset(
    {
        "config.yaml",
        "noise.npz",
        "meta_indices.npz",
        "metrics.csv",
        "train.log",
        CHECKPOINT,
        "best.pt",
        "signals",
        "tb",
        "plots",
    }
)  # signals/: train's diagnostics; tb/: its TensorBoard events; plots/: `hrp-ood plot`'s
EVALUATION_ENTRY = re.compile(r"eval_.+|cache")  # `hrp-ood evaluate`'s default output and feature-cache folders
LOCK_FILE = ".lock"
SET_ASIDE = ".replaced"
# atomic writes' temporaries: io.atomic_write's ".<name>.<random>.tmp", ".best.pt.tmp", older "<name>.npz.tmp"
STALE_TEMPORARY = re.compile(r"\..+\.tmp|.+\.npz\.tmp")


MAX_RUN_NAME_BYTES = 200


def check_run_name(name: str, shorten: str = "choose a shorter --name") -> None:
    """A run name is one folder name inside --out-dir: not empty, no path separator, not '.' or '..'."""
    separators = {os.sep, os.altsep} - {None}
    if not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise UserError(
            f"run name {shown(name)} must be one folder name (no '/', not '.' or '..'): the run goes to "
            "<out-dir>/<name>; choose the parent folder with --out-dir"
        )
    if len(os.fsencode(name)) > MAX_RUN_NAME_BYTES:
        raise UserError(
            f"run name {cut(name)} is {len(os.fsencode(name))} bytes, over {MAX_RUN_NAME_BYTES}: a file name may have "
            f"255 and the run's files add suffixes to it; {shorten}"
        )


def _is_run_entry(name: str) -> bool:
    return (
        name in RUN_FILES
        or name in (LOCK_FILE, SET_ASIDE)
        or EVALUATION_ENTRY.fullmatch(name) is not None
        or STALE_TEMPORARY.fullmatch(name) is not None
    )


class RunFolder:
    """One training process's hold on its run folder, from the checks before training to the end of the run.

    Every method but `claim` is a no-op until `claim` succeeded (so every rank of a data-parallel run may call
    them; rank 0 alone claims).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = False  # the folder did not exist before this process made it
        self._lock_fd: int | None = None
        self._replacing = ""  # what a fresh start replaces, said once it has replaced it

    # ---- claiming ------------------------------------------------------------------------------------
    def claim(self, *, resume: bool, overwrite: bool) -> bool:
        """Create the folder if needed, lock it, clean temporaries and check what it holds.

        Returns whether the run continues from the folder's checkpoint. Raises a UserError, having changed
        nothing, when the folder holds a run that this command may not replace or files that are not a run.
        """
        if resume and not (self.path / CHECKPOINT).exists() and not self._entries_if_folder():
            raise UserError(
                f"--resume: no checkpoint {shown(self.path / CHECKPOINT)} to resume from; drop --resume "
                "to start the run"
            )
        check_output_folder(self.path.parent, "--out-dir")
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise UserError(f"run folder {shown(self.path)} is a file; choose another --name or --out-dir")
        try:
            self.path.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            pass
        except OSError as err:
            raise write_error(self.path, err) from None
        self._lock()
        self._remove_stale_temporaries()
        return self._check_contents(resume=resume, overwrite=overwrite)

    def _entries_if_folder(self) -> list[str]:
        """Names in the folder other than the lock file ([] when the folder does not exist)."""
        if not self.path.is_dir():
            return []
        return sorted(name for name in os.listdir(self.path) if name != LOCK_FILE)

    def _lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_error(lock_path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise write_error(lock_path, err) from None
            raise UserError(
                f"run folder {shown(self.path)} is in use by another `hrp-ood train` (pid {holder}); "
                "wait for it to end, or train under another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _remove_stale_temporaries(self) -> None:
        stale = [name for name in self._entries_if_folder() if STALE_TEMPORARY.fullmatch(name)]
        for name in stale:
            (self.path / name).unlink(missing_ok=True)
        if stale:
            log.info(
                "removed %d temporary file(s) left by an interrupted write in %s: %s",
                len(stale),
                shown(self.path),
                ", ".join(stale),
            )

    def _check_contents(self, *, resume: bool, overwrite: bool) -> bool:
        entries = self._entries_if_folder()
        if (self.path / CHECKPOINT).exists():
            if resume:
                return True
            if not overwrite:
                raise UserError(
                    f"run folder {shown(self.path)} already holds a run; pass --resume to continue it "
                    "or --overwrite to replace it"
                )
        foreign = [name for name in entries if not _is_run_entry(name)]
        if foreign:
            listed = ", ".join(map(shown, foreign[:3])) + (", …" if len(foreign) > 3 else "")
            raise UserError(
                f"run folder {shown(self.path)} holds files that are not part of an hrp-ood run "
                f"({listed}); move them away or choose another --name or --out-dir"
            )
        if (self.path / CHECKPOINT).exists():
            self._replacing = f"--overwrite: replaced the run in {shown(self.path)}"
        elif entries:
            self._replacing = (
                f"run folder {shown(self.path)} holds a run that stopped before its first checkpoint: "
                "starting it again" + (" (--resume has nothing to resume)" if resume else "")
            )
        return False

    # ---- a fresh start -------------------------------------------------------------------------------
    def start_afresh(self) -> None:
        """Move what the folder holds into .replaced/, so the new run starts empty and a failed start can undo."""
        if self._lock_fd is None:
            return
        aside = self.path / SET_ASIDE
        if aside.exists():  # left by a start that crashed: it holds a run the user had asked to replace
            shutil.rmtree(aside)
        entries = self._entries_if_folder()
        if not entries:
            return
        aside.mkdir()
        for name in entries:
            os.replace(self.path / name, aside / name)

    def keep(self) -> None:
        """The new run has started: delete what `start_afresh` moved aside, and say what that was."""
        aside = self.path / SET_ASIDE
        if self._lock_fd is not None and aside.exists():
            log.warning("%s; removed %s", self._replacing, ", ".join(sorted(os.listdir(aside))))
            shutil.rmtree(aside)

    def abandon(self) -> None:
        """Setting up the run failed: remove what it wrote, put back what it moved aside (or remove the folder it
        created), and release the lock."""
        if self._lock_fd is None:
            return
        aside = self.path / SET_ASIDE
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif aside.exists():
            for name in self._entries_if_folder():
                if name != SET_ASIDE:
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            for name in os.listdir(aside):
                os.replace(aside / name, self.path / name)
            aside.rmdir()
        self.release()

    def release(self) -> None:
        """Unlock the folder (the lock file stays: removing it would let a third process lock another file)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
