"""What a path is, checked before it is opened: reading a FIFO blocks until something writes
to it (forever, for a user who passed one by mistake) and a device reads as endless or empty
data, so ldm reads only regular files and folders. The files ldm keeps in an output folder
(manifest, claims) are opened by open_regular, which never follows a link: a link planted there
would have ldm write to whatever file it points at."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ldm_cli.errors import LdmError

KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def user_path(text: str) -> Path:
    """A path as a user (or a file: a prompts-file line, a PNG's record) wrote it, `~` expanded as
    the shell does; `~name` of no known user stays as written, where pathlib's expanduser raises."""
    return Path(os.path.expanduser(text))


def exists(path: Path) -> bool:
    """Whether anything is at `path`; a name no file can have (too long, holding a NUL) is
    nothing there, where Path.exists raises."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


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


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor on the regular file `path`, opened with `flags` without following a symbolic
    link or blocking on a FIFO; anything else there is one line. FileNotFoundError is raised as
    is (without O_CREAT a missing file is the caller's to handle)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LdmError(f"{str(path)!r} is a symbolic link; ldm does not follow links to the files it keeps "
                           "in an output folder: remove it") from None
        if e.errno == errno.EISDIR:
            raise LdmError(f"{str(path)!r} is a folder, not a file; remove or rename it") from None
        raise LdmError(f"cannot open {str(path)!r} ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in KINDS if test(mode)), "a special file")
        raise LdmError(f"{str(path)!r} is {kind}, not a file; remove or rename it")
    return fd


def is_regular(path: Path) -> bool:
    """Whether `path` is (or links to) a regular file; never blocks, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_input(path: Path) -> BinaryIO:
    """`path` opened for reading, refused unless a regular file. Opened without waiting
    (O_NONBLOCK), so a FIFO put in its place after a check cannot block; OSError as open()'s."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _refusal(path, mode, False)
    return os.fdopen(fd, "rb")  # O_NONBLOCK changes nothing for a regular file's reads
