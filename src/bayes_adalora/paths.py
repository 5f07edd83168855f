"""What a path names, in words a message can use: a file, a folder, a FIFO, a symlink loop, nothing; and how
an output is written whole or not at all (a hidden partial sibling, renamed into place).

One place, so that every reader and writer describes the same thing the same way (a FIFO is never
"a folder", a symlink loop never "does not exist").
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

NOTHING = "nothing"
FILE = "a file"
FOLDER = "a folder"


def partial_path(path: Path) -> Path:
    """The hidden sibling an output file or folder is written to before it is renamed to `path`."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields the partial sibling of `path` to write; when the block ends it replaces `path` at once, and when
    the block raises it is removed: the file is there whole, or not at all."""
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def path_kind(path: Path) -> str:
    """What `path` names: FILE, FOLDER, NOTHING, or another phrase ("a FIFO (named pipe)", "a symlink loop")."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return "a symbolic link to nothing"
        if err.errno in (errno.EACCES, errno.EPERM):
            return "something that cannot be read (permission denied)"
        return NOTHING  # ENOENT, and ENOTDIR: a path under a file names nothing
    if stat.S_ISDIR(mode):
        return FOLDER
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def exists_at_all(path: Path) -> bool:
    """Whether anything is at `path`, a broken or looping symlink included."""
    return os.path.lexists(path)


def _require(path: Path, what: str, expected: str, noun: str) -> None:
    kind = path_kind(path)
    if kind == NOTHING:
        raise UserError(f"{what} {path} does not exist")
    if kind != expected:
        raise UserError(f"{what} {path} is {kind}, not {noun}")


def require_file(path: Path, what: str) -> None:
    """Refuse a path to read that is not a regular file, saying what it is instead."""
    _require(path, what, FILE, "a file")


def require_folder(path: Path, what: str) -> None:
    """Refuse a path to read that is not a folder, saying what it is instead."""
    _require(path, what, FOLDER, "a folder")
