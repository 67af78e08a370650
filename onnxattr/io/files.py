"""Writing output files so that an interrupted run never leaves a half-written one, and one
writer per output folder."""

import contextlib
import os
import re
import secrets
from pathlib import Path

from ..errors import OnnxAttrError

# atomic_path's temporary for "<folder>/<stem><suffix>", and the pattern remove_temporaries finds
# a killed run's leftovers by (tests/test_report.py checks that the two agree)
_TEMPORARY = ".{stem}.{token}.tmp{suffix}"  # token: 8 hex digits
TEMPORARY_NAME = re.compile(r"\..*\.[0-9a-f]{8}\.tmp(\.[^.]*)?", re.S)
LOCK_NAME = ".onnxattr.lock"  # the lock file of folder_lock


class WriteError(OSError):
    """Writing `path` failed (a full disk, a read-only folder...): the message names the file."""

    def __init__(self, path, cause, doing="write"):
        super().__init__(f"cannot {doing} {path}: {cause.strerror or cause}")
        self.path = Path(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    An OSError (writing, renaming) is raised as a WriteError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(path)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise


def _new_temporary(path):
    """Create an empty temporary for `path` (permissions as the umask says) and return it."""
    while True:
        tmp = path.with_name(_TEMPORARY.format(stem=path.stem, token=secrets.token_hex(4),
                                               suffix=path.suffix))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # a name taken: draw another
            continue


def remove_temporaries(folder):
    """Remove atomic_path's temporaries left under `folder` by a killed run (hold its lock)."""
    for path in Path(folder).rglob("*"):
        if TEMPORARY_NAME.fullmatch(path.name) and path.is_file():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise WriteError(path, err, "remove") from err


@contextlib.contextmanager
def folder_lock(folder, busy):
    """Hold `folder`'s lock (creating the folder) for the block, or raise OnnxAttrError(`busy`)
    if another process holds it. The lock is an flock on `folder/LOCK_NAME`: it goes with the
    process, so a killed run never leaves a stale one."""
    import fcntl  # POSIX only: imported here so that the rest of onnxattr imports anywhere

    lock = Path(folder) / LOCK_NAME
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise WriteError(lock, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OnnxAttrError(busy) from None
        yield
    finally:
        os.close(fd)
