"""What a path is, checked before it is opened: reading a FIFO blocks until something writes
to it (forever, for a user who passed one by mistake) and a device reads as endless or empty
data, so ldm reads only regular files and folders."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ldm_cli.errors import LdmError

KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def check_openable(path: Path, folders: bool = False) -> None:
    """Refuse `path` unless it is a regular file (or, with `folders`, a folder). A missing path
    passes: the caller's own message says what was expected there."""
    try:
        mode = os.stat(path).st_mode  # follows links, as open() would; never blocks
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise LdmError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    if stat.S_ISREG(mode) or (folders and stat.S_ISDIR(mode)):
        return
    raise _refusal(path, mode, folders)


def _refusal(path: Path, mode: int, folders: bool) -> LdmError:
    kind = next((name for test, name in KINDS if test(mode)), "a special file")
    wanted = "a file or folder" if folders else "a file"
    return LdmError(f"{str(path)!r} is {kind}, not {wanted}; ldm reads only regular files{' and folders' * folders}")


def is_regular(path: Path) -> bool:
    """Whether `path` is (or links to) a regular file; never blocks, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refused unless a regular file. Opened without waiting
    (O_NONBLOCK), so a FIFO put in its place after a check cannot block; OSError as open()'s."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refusal(path, mode, False)
    return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file's reads
