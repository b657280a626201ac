"""Crash-safe writing of files and whole directories (no torch, no upstream imports).

Every file and directory the plugin writes goes through here.

A directory is written into a temporary sibling and swapped into place only when it is
complete, so a process killed at any moment leaves either the previous complete
directory or the new one, never a mix:

- On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call: the target path never
  goes missing.
- Elsewhere (or on a filesystem without it) the complete new directory is first renamed
  to ``.NAME.ready-ID``, the old one aside to ``.NAME.old-ID``, then the new one into
  place. A crash between those renames leaves no ``NAME``; ``recover_dir`` puts the
  complete one back (the new one if it got as far as ``ready``, else the old one).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .core.errors import UsageError

TMP_SUFFIX = ".tmp"
READY_TAG = ".ready-"
OLD_TAG = ".old-"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_path(path: Path) -> None:
    # Directories too: a rename is durable only once its parent directory is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    # EINVAL/ENOSYS/EOPNOTSUPP: this kernel or filesystem cannot exchange; fall back.
    if err in (22, 38, 95):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _siblings(target: Path, tag: str) -> list[Path]:
    prefix = f".{target.name}{tag}"
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def recover_dir(target: Path | str) -> Path:
    """Undo a crash between the renames of ``commit_dir``; returns ``target``.

    If ``target`` is missing but a complete sibling survives, it is renamed back:
    the newest ``ready`` one (the new contents) before the newest ``old`` one.
    """
    target = Path(target)
    if not os.path.lexists(target):
        candidates = _siblings(target, READY_TAG) or _siblings(target, OLD_TAG)
        if candidates:
            os.rename(candidates[-1], target)
            _fsync_path(target.parent)
    return target


def recover_path(path: Path | str) -> Path:
    """``recover_dir`` on ``path`` and each missing ancestor, outermost first.

    For a path inside a checkpoint (``run/layers.0``) whose ``run`` was mid-swap.
    """
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if not os.path.lexists(p):
            recover_dir(p)
    return path


def remove_stale(target: Path | str) -> None:
    """Delete leftovers of interrupted writes of ``target`` (only while ``target`` exists).

    Call only where nothing else is writing ``target`` at the same time.
    """
    target = Path(target)
    if not target.is_dir():
        return
    for tag in (READY_TAG, OLD_TAG):
        for p in _siblings(target, tag):
            shutil.rmtree(p, ignore_errors=True)
    if target.parent.is_dir():
        for p in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


def staging_dir(target: Path | str) -> Path:
    """A fresh empty temporary sibling of ``target`` (its parent is created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))


def commit_dir(tmp: Path | str, target: Path | str) -> None:
    """Replace ``target`` by the complete directory ``tmp`` (see the module docstring)."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
    else:
        tag = uuid.uuid4().hex[:8]
        ready = target.with_name(f".{target.name}{READY_TAG}{tag}")
        old = target.with_name(f".{target.name}{OLD_TAG}{tag}")
        os.rename(tmp, ready)
        os.rename(target, old)
        os.rename(ready, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(target.parent)


def link_missing(src: Path | str, dst: Path | str) -> None:
    """Put into ``dst`` every entry of ``src`` that ``dst`` lacks, as hard links.

    Lets a new checkpoint keep what the old one held beside it (sparsify's ``best/``)
    without copying data; files are never rewritten in place here, so sharing inodes
    is safe. Falls back to a copy where hard links are not allowed.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return
    for entry in src.iterdir():
        if entry.name.endswith(TMP_SUFFIX) or READY_TAG in entry.name or OLD_TAG in entry.name:
            continue  # leftovers of interrupted writes
        out = dst / entry.name
        if os.path.lexists(out):
            if entry.is_dir() and out.is_dir() and not entry.is_symlink():
                link_missing(entry, out)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, out, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, out)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextmanager
def atomic_dir(target: Path | str, *, overwrite: bool = True, error=UsageError) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; swap it into place if the block succeeds.

    A failure (or Ctrl-C) inside the block removes the temporary and leaves ``target``
    untouched. With ``overwrite=False`` an existing ``target`` is refused up front, and a
    parent that cannot be created (say, a regular file) is reported, both as ``error``.
    """
    target = Path(target).absolute()
    if not overwrite and target.exists():
        what = "directory" if target.is_dir() else "file"
        raise error(f"output {target} already exists ({what}); choose a new path or pass overwrite")
    try:
        tmp = staging_dir(target)
    except OSError as e:
        raise error(f"cannot create output {target}: {e.strerror} ({e.filename})") from None
    try:
        yield tmp
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path | str, write: Callable[[str], object]) -> None:
    """Write a file by calling ``write(tmp_path)`` on a temporary sibling, then rename it in.

    The parent folder is created; on any failure the temporary is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_dir(path: Path | str) -> None:
    """Raise ``UsageError`` now if directory ``path`` cannot be created and written in.

    Run before long work whose results go there: a regular file in the way or a
    read-only filesystem is found at once, not at the first save. A probe file in the
    nearest existing ancestor is created and removed; nothing is left behind.
    """
    path = Path(path).absolute()
    ancestor = path
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write to {path}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to {path}: {ancestor} is not writable ({e.strerror})") from None
