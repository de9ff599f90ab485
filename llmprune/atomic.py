"""Atomic directory replacement: write a directory beside its target, then swap it in.

Used by every writer of a checkpoint (checkpoint.save_pruned, and the streamed save) so that at every
instant the target path holds either the complete old directory or the complete new one:

    with staging(out) as tmp:     # .NAME.partial-PID, a fresh sibling (same filesystem, so renames are atomic)
        ... write and verify into tmp ...
                                  # on exit: publish(tmp, out), one atomic swap, then the old copy is removed;
                                  # on any error or interrupt: tmp is removed, out untouched

`publish` exchanges the two directories with Linux renameat2(RENAME_EXCHANGE) when the filesystem
supports it (no instant without `out`). Elsewhere it renames out -> .NAME.old-PID, then staging -> out;
a crash between those two renames is repaired by the next run (`recover` restores the old copy).

Leftovers of killed runs (`.NAME.partial-PID`, `.NAME.old-PID` whose PID is no longer running) are
found by `leftovers` and reported by `recover`, with their size and the command that removes them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True)
class Leftover:
    path: Path
    kind: str  # "partial" (an interrupted write) or "old" (a replaced directory not yet removed)
    pid: int

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and not f.is_symlink())


def staging_name(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def start(out: str | Path) -> Path:
    """A fresh, empty staging directory beside `out` (an old one of this very process is removed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(out, "partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def staging(out: str | Path) -> Iterator[Path]:
    """Write into the yielded hidden directory; on success it replaces `out` atomically (publish), on any
    error or interrupt it is removed and `out` stays as it was."""
    out = Path(out)
    tmp = start(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        discard(tmp)
        raise


def discard(staging: str | Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def publish(staging: str | Path, out: str | Path) -> None:
    """Move the finished `staging` directory to `out`, replacing what is there without a gap where possible."""
    staging, out = Path(staging), Path(out)
    if not out.exists():
        _rename(staging, out)
        return
    if _exchange(staging, out):  # out is new now; staging holds the old copy
        old = staging_name(out, "old")
        try:
            _rename(staging, old)  # so a crash during the removal leaves a leftover named for what it is
        except OSError:
            old = staging
    else:
        old = staging_name(out, "old")
        _rename(out, old)
        try:
            _rename(staging, out)  # the one non-atomic window; `recover` repairs a crash right here
        except BaseException:
            _rename(old, out)  # put the old directory back before reporting the failure
            raise
    try:
        _remove(old)
    except OSError as e:  # the new directory is in place: the save succeeded, only the cleanup did not
        log.warning("%s is in place, but removing the replaced copy %s failed (%s); remove it with: rm -rf %s",
                    out, old, e, _quote(old))


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when unsupported here."""
    if os.environ.get("LLMPRUNE_NO_RENAME_EXCHANGE"):
        return False
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, 0):
        return False  # filesystem or kernel without exchange: use the two-rename path
    raise OSError(err, os.strerror(err), str(a))


_LIBC: ctypes.CDLL | None | bool = False


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name, use_errno=True) if name else None
        except OSError:
            _LIBC = None
    return _LIBC  # type: ignore[return-value]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(out: str | Path) -> list[Leftover]:
    """Hidden siblings of `out` left by runs that were killed (their PID is gone), oldest PID first."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    found = []
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not _alive(int(m.group(2))):
            found.append(Leftover(p, m.group(1), int(m.group(2))))
    return sorted(found, key=lambda x: (x.pid, x.kind))


def recover(out: str | Path) -> list[Leftover]:
    """Repair a swap that was killed half-way, and report (log) any other leftovers; returns those left.

    `out` missing while `.NAME.old-PID` exists means a run died between its two renames: the old
    directory is moved back. Everything else is reported, not deleted: it may be the only copy of
    something the user wants (a killed run's partial output is never a usable checkpoint, though).
    """
    out = Path(out)
    found = leftovers(out)
    olds = [x for x in found if x.kind == "old"]
    if olds and not out.exists():
        back = olds[-1]
        _rename(back.path, out)
        log.warning("restored %s from %s: an earlier run (pid %d) was stopped while replacing it", out, back.path.name,
                    back.pid)
        found.remove(back)
    for x in found:
        what = ("an interrupted write (never a complete checkpoint)" if x.kind == "partial"
                else "the directory an earlier --overwrite replaced")
        log.warning("leftover from a stopped run (pid %d): %s is %s, %.1f MB; nothing uses it. Remove it with: "
                    "rm -rf %s", x.pid, x.path, what, x.size() / 1e6, _quote(x.path))
    return found


def _quote(p: Path) -> str:
    import shlex

    return shlex.quote(str(p))


__all__ = ["Leftover", "discard", "leftovers", "publish", "recover", "staging", "staging_name", "start"]
