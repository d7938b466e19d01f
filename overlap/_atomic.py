"""Atomic output files: a write that fails leaves the previous file, never a truncated one.

Every file `overlap` writes (traces, Gantt pictures, ``--json`` figures, graph JSON) goes
through here: the content goes to a temporary file in the same folder, which is renamed over the
target only once it is complete (a rename within one file system is atomic). Any failure removes
the temporary file and raises :class:`~overlap.errors.OutputError` naming the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from overlap.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it fully; it then replaces ``path``.

    The folder of ``path`` is created if needed. Works for writers that want a file name (e.g.
    matplotlib's ``savefig``) as well as for text.
    """
    target = Path(path)
    if os.path.isdir(target):
        raise OutputError(f"cannot write {str(target)!r}: it is a folder")
    for parent in target.parents:
        if os.path.lexists(parent):
            if not os.path.isdir(parent):
                raise OutputError(f"cannot write {str(target)!r}: {str(parent)!r} is not a folder")
            break
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600): keep the mode of the file being replaced, or
        # give a new one the usual 0644.
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any, **dump: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``dump`` goes to ``json.dumps``)."""
    return write_text(path, json.dumps(data, **dump))
