"""The one guard every command runs on a path it will write, before any work starts.

Refused, with one line naming the path: an output that is one of the command's inputs (same
file by inode or by real path, through links), an existing directory or other non-regular
file (a device node, a FIFO, a socket), and an output whose directory is missing or not
writable. An existing regular file that is no input may be replaced.
`flag` names the path in the message: a Setting (worded with the command's flag) or plain text.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import BadSetting, Setting


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(target: str | os.PathLike, inputs=(), flag: str = "output") -> None:
    """Raise a UserError (BadSetting) unless `target` can be written without touching an input or a non-file."""
    target = Path(target)
    for source in inputs:
        if source and _same_file(target, Path(source)):
            raise BadSetting(flag, f"{target} is the input {source}: it would be overwritten; "
                                   "choose another output path")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BadSetting(flag, f"{target}: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise BadSetting(flag, f"{target} is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise BadSetting(flag, f"{target} exists and is not a regular file (a device, FIFO or socket); "
                                   "it is never replaced")
    check_writable_dir(target.parent if str(target.parent) else Path("."), flag)


def check_writable_dir(directory: str | os.PathLike, flag: str = "output") -> None:
    directory = Path(directory)
    if not directory.is_dir():
        raise BadSetting(flag, f"directory does not exist: {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadSetting(flag, f"directory is not writable: {directory}")


def check_output_dir(directory: str | os.PathLike, inputs=(), flag: str = Setting.OUTPUT_DIR) -> None:
    """A directory to create or fill: not a file, not an input, inside a writable parent."""
    directory = Path(directory)
    for source in inputs:
        if source and _same_file(directory, Path(source)):
            raise BadSetting(flag, f"{directory} is the input {source}; choose another directory")
    if directory.exists():
        if not directory.is_dir():
            raise BadSetting(flag, f"{directory}: exists and is not a directory")
        check_writable_dir(directory, flag)
        return
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    check_writable_dir(parent, flag)
