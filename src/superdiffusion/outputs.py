"""Output paths checked before long work starts: a one-line InputError instead of a traceback at the end.

Writability is tested by trying (create the missing folders, write and delete a probe file, remove the folders
made), since os.access answers yes to root even on a read-only file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def unwritable(folder: str | Path) -> str | None:
    """Why `folder` cannot be (made into) a folder to write files in, or None when it can; leaves nothing behind."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        for made in reversed(missing):
            made.mkdir()
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write there: {err.strerror or type(err).__name__}"
    finally:
        for made in missing:  # only the folders made here, and only while still empty
            try:
                made.rmdir()
            except OSError:
                pass
    return None


def check_output_dir(out_dir: str | Path, *, what: str = "--out") -> Path:
    """`out_dir` if it is, or can be made, a folder we can write to; else a one-line error naming it."""
    reason = unwritable(out_dir)
    if reason:
        raise InputError(f"{out_dir}: unusable {what} folder ({reason})")
    return Path(out_dir)


def check_output_file(path: str | Path, *, what: str = "--out") -> Path:
    """A file path that does not exist yet (user files are never overwritten) in a folder we can write to."""
    path = Path(path)
    if path.exists():
        raise InputError(f"{path}: exists already; choose another {what} (it is never overwritten)")
    reason = unwritable(path.parent)
    if reason:
        raise InputError(f"{path}: cannot write this {what} file (its folder {path.parent}: {reason})")
    return path
