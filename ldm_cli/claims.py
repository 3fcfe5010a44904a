"""Claims on the images of `ldm batch`: a process renders an image only while it holds the
image's claim, so runs sharing an output folder split the work and never render an image twice.

A claim is an exclusive flock on `OUT/.ldm-claim-<hash>.lock`, the hash of what makes the image.
The kernel drops a process's locks when it ends, however it ends, so a killed run's claims are
free at once; the files it leaves are removed by the next run (remove_free). The holder removes
the file while still holding it, and a claimer checks after locking that the file it locked is
still the one at that path, so a removed file is never mistaken for a claim. A claim is no
record: whoever takes one still asks the manifest, as the image may have been finished just
before. Claim files are opened without following links (files.open_regular): a link planted in
the folder under a claim's name is refused, never written through.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from ldm_cli import files
from ldm_cli.errors import LdmError

PREFIX = ".ldm-claim-"


class Claim:
    """A held claim, until `release`."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        try:
            self.path.unlink()  # while still locked: see the module's note
        except FileNotFoundError:
            pass
        os.close(self.fd)


def path_of(folder: Path, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return folder / f"{PREFIX}{digest[:24]}.lock"


def take(folder: Path, identity: dict, wait: bool = False) -> Claim | None:
    """The claim on the image `identity` describes; None when a live process holds it, unless
    `wait`, which waits for the holder to let go."""
    folder.mkdir(parents=True, exist_ok=True)  # made by the first claim, so a run failing before leaves none
    return _take(path_of(folder, identity), wait)


def remove_free(folder: Path) -> None:
    """Remove the claim files nobody holds: a killed run leaves the file of the image it was
    rendering, or had just recorded."""
    for path in folder.glob(f"{PREFIX}*.lock"):
        claim = _take(path, wait=False)
        if claim:
            claim.release()


def _take(path: Path, wait: bool) -> Claim | None:
    while True:
        fd = files.open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                return Claim(path, fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it meanwhile: claim the path afresh


def wait(folder: Path, identity: dict) -> None:
    """Return once no process holds the image's claim."""
    take(folder, identity, wait=True).release()


def holder(folder: Path, identity: dict) -> str:
    """Who holds the claim, as its holder wrote it ("pid 123 on host")."""
    try:
        fd = files.open_regular(path_of(folder, identity), os.O_RDONLY)
    except (OSError, LdmError):
        return "another process"
    try:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
