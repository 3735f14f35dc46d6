"""Write files under a temporary name and rename at the end: a crash leaves nothing at the target.

The temporary file is `.NAME.PID.XXXX.partial` beside the target. A process killed with SIGKILL
cannot remove it, so each new write first removes the partials of the same target whose writer
process is gone. The result gets the permission bits an ordinary `open(..., "w")` would give it:
an existing file's own, else 0666 minus the umask (mkstemp alone would leave 0600).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

from .output_paths import check_output_path
from .signals import raise_if_terminated

PARTIAL_SUFFIX = ".partial"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _partial_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+{re.escape(PARTIAL_SUFFIX)}$")


def remove_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.PID.XXXX.partial` files beside `target` whose writer PID is dead."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    pattern = _partial_pattern(target.name)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = pattern.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, inputs=()):
    """Yield a temporary path beside `target`; rename it onto `target` only on success.

    `target` is checked first (output_paths.check_output_path, with `inputs`)."""
    target = Path(target)
    check_output_path(target, inputs)
    directory = target.parent if str(target.parent) else Path(".")
    remove_stale_partials(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(target))
        check_output_path(target, inputs)  # nothing replaced it with a directory meanwhile
        raise_if_terminated()  # a SIGTERM during a native call: never commit the output
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")

