"""A command's work directory (--work-dir): made with a one-line error when it cannot be, and
removed again when the run that made it fails, so a refused run leaves nothing behind.

What the run wrote stays (a rerun resumes from it): only the directories this run created, and
left empty, are removed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import UserError


def _remove_empty_tree(top: Path) -> None:
    """rmdir every empty directory under `top` (deepest first), then `top` if empty."""
    for root, dirs, _ in os.walk(top, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(top)


@contextlib.contextmanager
def work_dir(path: str | os.PathLike, flag: str = "--work-dir"):
    """Create `path` (and its missing parents) for the block; on any failure in the block remove
    those of them that were created here and are still empty."""
    path = Path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for made in missing:
            with contextlib.suppress(OSError):
                os.rmdir(made)
        raise UserError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: directory is not writable")
    try:
        yield path
    except BaseException:
        for made in missing:  # deepest first
            _remove_empty_tree(made)
        raise
