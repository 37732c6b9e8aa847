"""Atomic writes: every file and directory qera writes goes through this module.

Guarantees:

- A file or directory appears at its final path whole or not at all (written under a temporary
  name in the same directory, flushed to disk, then renamed).
- Creating without ``overwrite`` is exclusive: if the target appeared meanwhile (another run
  racing on the same output), the final step fails instead of replacing it.
- Overwriting a directory leaves the old or the new one at the path at every instant: on Linux
  the two are swapped with ``renameat2(RENAME_EXCHANGE)``. Where that call is missing the old
  directory is first renamed to ``.<name>.old-<pid>``; if the process dies between the two renames,
  :func:`recover_directory` (called by every loader and writer) puts the old one back.
- Temporary folders of dead processes (``.<name>.tmp-<pid>-*``) are removed on the next write.
- Scratch folders (statistics spilled to disk, cached activations) are named
  ``<prefix><host>-<pid>-*`` and locked by :func:`scratch_dir`. Before it creates one, it removes
  the scratch of this host's dead runs: a SIGKILLed run cannot clean up after itself, and its
  scratch can be gigabytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from qera.util.errors import QeraError

log = logging.getLogger(__name__)

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the OS or file system lacks it, OSError otherwise."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def check_parent(path: Path) -> Path:
    """Create ``path``'s parent if needed; a clear error when it is a file or not writable."""
    parent = path.parent if str(path.parent) else Path(".")
    for p in [parent, *parent.parents]:
        if p.exists() and not p.is_dir():
            raise QeraError(f"cannot write {path}: {p} is a file, not a directory")
        if p.exists():
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QeraError(f"cannot create the directory {parent} for {path}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QeraError(f"cannot write {path}: the directory {parent} is not writable")
    return parent


def _remove_dead(parent: Path, pattern: re.Pattern, locked: bool = False) -> None:
    """Remove the entries of ``parent`` whose name matches ``pattern`` with a dead process id (group 1).

    ``locked``: the entries are folders their owner holds an ``flock`` on (scratch): a folder is
    removed only if nobody holds it, whatever its process id says.
    """
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if locked:
            _remove_if_unlocked(entry)
            continue
        log.info("removing %s, left by an interrupted run", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_if_unlocked(entry: Path) -> None:
    if entry.is_symlink() or not entry.is_dir():
        return
    fd = _open_dir(entry)
    if fd is None:
        return
    try:
        if _lock(fd):
            log.info("removing %s, left by a run that died", entry)
            shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)


def cleanup_stale(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by processes that no longer run."""
    _remove_dead(path.parent, re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)-"))


def _host_tag() -> str:
    """This machine's name, reduced to characters safe in a file name, with a hash of the exact name
    (``node-1`` and ``node_1`` stay apart)."""
    raw = os.uname().nodename if hasattr(os, "uname") else "host"
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", raw)[:32] or "host"
    return f"{safe}_{hashlib.sha1(raw.encode()).hexdigest()[:6]}"


def _lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting: False when another open file holds it
    (True where the platform has no ``flock``: liveness then rests on the process id alone)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


class Scratch:
    """A scratch folder of this process, ``<base>/<prefix><host>-<pid>-XXXX``.

    It is marked live by an exclusive ``flock`` held until :meth:`remove`. The kernel drops the lock
    when the process dies, even by SIGKILL, so the next run can tell dead scratch from live scratch.
    That holds even for processes whose ids it cannot see (containers sharing a host name and a
    folder).
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def remove(self) -> None:
        """Delete the folder and everything in it, then let go of the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def scratch_dir(base: str | os.PathLike, prefix: str) -> Scratch:
    """A new, empty, locked scratch folder under ``base``, after removing the scratch that runs of
    this host left there when they died.

    An entry is removed only if its process id is not running here and nobody holds its lock. The
    folder is created under a hidden name, locked, then renamed into place, so no sweeper ever sees
    it unlocked.
    """
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QeraError(f"cannot create the scratch folder {base}: {exc.strerror or exc}") from None
    host = _host_tag()
    _remove_dead(base, re.compile(rf"^{re.escape(prefix)}{re.escape(host)}-(\d+)-"), locked=True)
    name = f"{prefix}{host}-{os.getpid()}-"
    try:
        hidden = Path(tempfile.mkdtemp(prefix=f".{name}", dir=base))
    except OSError as exc:
        raise QeraError(f"cannot create scratch in {base}: {exc.strerror or exc}") from None
    fd = _open_dir(hidden)
    if fd is not None:
        _lock(fd)
    path = base / hidden.name[1:]
    os.rename(hidden, path)  # the folder keeps its inode, and so its lock
    return Scratch(path, fd)


def recover_directory(path: str | os.PathLike) -> None:
    """If an overwrite died between its two renames, move the old directory back to ``path``."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    pat = re.compile(rf"^\.{re.escape(path.name)}\.old-(\d+)$")
    for entry in sorted(path.parent.iterdir()):
        m = pat.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            log.warning("restoring %s from %s (an overwrite was interrupted)", path, entry)
            os.rename(entry, path)
            return


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere the common 0o022)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _temp_name(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` (file or directory) to ``path``; see the module docstring."""
    if not overwrite:
        try:
            if _renameat2(tmp, path, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise QeraError(f"output {path} appeared while this run was writing it; not replaced") from None
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise QeraError(f"output {path} appeared while this run was writing it; not replaced") from None
            raise
        if tmp.is_dir():
            if path.exists():
                raise QeraError(f"output {path} appeared while this run was writing it; not replaced")
            os.rename(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: exclusive creation
            except FileExistsError:
                raise QeraError(f"output {path} appeared while this run was writing it; not replaced") from None
            except OSError:
                if path.exists():
                    raise QeraError(f"output {path} appeared while this run was writing it; not replaced") from None
                os.rename(tmp, path)
            else:
                tmp.unlink()
        _fsync_dir(path.parent)
        return
    if not path.exists():
        publish(tmp, path, overwrite=False)
        return
    if tmp.is_dir() != path.is_dir():
        raise QeraError(f"cannot replace {path}: one of the old and the new output is a file, the other a directory")
    if not tmp.is_dir():
        os.replace(tmp, path)  # atomic for files everywhere
        _fsync_dir(path.parent)
        return
    if _renameat2(tmp, path, _RENAME_EXCHANGE):  # tmp now holds the old directory
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check an output path before slow work starts: parent writable, not existing unless ``overwrite``."""
    path = Path(path)
    recover_directory(path)
    if path.exists() and not overwrite:
        raise QeraError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    check_parent(path)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces/creates ``path`` atomically."""
    path = refuse_existing(path, overwrite)
    cleanup_stale(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(path), dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0o700: publish what mkdir would have made
    except OSError as exc:
        raise QeraError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        publish(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: str | os.PathLike, write: Callable[[Path], Any], overwrite: bool = True,
               durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``.

    ``durable=False`` skips the fsync: for scratch files that never outlive their run (cached
    activations), where a crash loses nothing worth keeping but a half-written file is still never seen."""
    path = Path(path)
    if not overwrite and path.exists():
        raise QeraError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    check_parent(path)
    cleanup_stale(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_name(path), dir=path.parent)
    except OSError as exc:
        raise QeraError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0o600: publish what open() would have made
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=float) + "\n", overwrite)


def write_figure(path: str | os.PathLike, fig: Any, dpi: int = 120, overwrite: bool = True) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names (``.png`` by default)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt), overwrite)
