"""Writing files so that a failed write never destroys what was there: write beside, then rename."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path):
    """A binary file object whose contents replace ``path`` only once all of them are written.

    The data goes to a temporary file beside ``path`` (same folder, so the final rename is atomic),
    is flushed to disk, and is renamed over ``path``. If anything fails on the way (a full disk,
    a size limit, an interrupt) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; give it a new file's mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig`` through :func:`atomic_file`, the format taken from ``path``'s suffix (PNG without one)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_file(path) as handle:
        fig.savefig(handle, format=fmt, **kwargs)
