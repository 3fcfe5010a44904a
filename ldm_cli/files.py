"""What a path is, checked before it is opened: reading a FIFO blocks until something writes
to it (forever, for a user who passed one by mistake) and a device reads as endless or empty
data, so ldm reads only regular files and folders."""
from __future__ import annotations

import os
import stat
from pathlib import Path

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
    kind = next((name for test, name in KINDS if test(mode)), "a special file")
    wanted = "a file or folder" if folders else "a file"
    raise LdmError(f"{str(path)!r} is {kind}, not {wanted}; ldm reads only regular files{' and folders' * folders}")
