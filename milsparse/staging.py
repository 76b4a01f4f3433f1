"""Where milsparse writes: output-path checks, atomic staging, and its temporary folders.

- `check_output_path` refuses, before any work, an output that cannot be written or would
  touch an input.
- `staged(path, overwrite=)` yields a path in a sibling temporary folder; on success the new
  package moves into place atomically. Without overwriting, the move refuses an output that
  appeared meanwhile (`renameat2(RENAME_NOREPLACE)`, or its check-free equivalent); with it, the
  old package and the new one swap in one step (`RENAME_EXCHANGE`), so the output path always
  holds a complete package. Where the file system cannot swap, the old package is moved aside
  with a note of where it belongs, and a later run puts it back if the process died before the
  new one was in place: an old package is never lost.
- Temporary folders are named `<prefix>milsparse-tmp-<pid>-<random>`; a later run removes those
  of processes that are gone (SIGKILL, power loss). SIGINT, SIGTERM and SIGHUP unwind normally.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

from milsparse.errors import ConfigError

__all__ = [
    "check_output_path",
    "staged",
    "spill_folder",
    "remove_stale_temporaries",
    "TEMP_TAG",
]

TEMP_TAG = "milsparse-tmp-"
# In a staging folder: the old package while it is moved aside, and the name it belongs at.
_PREVIOUS = "previous"
_RESTORE_TO = "restore-to"
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# The longest temporary name milsparse puts beside an output (prefix, pid, random part).
_TEMP_NAME_BYTES = 48


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_length(path: Path) -> None:
    name_max = 255
    path_max = 4096
    with contextlib.suppress(OSError, AttributeError, ValueError):
        folder = str(path.parent) or "."
        name_max = os.pathconf(folder, "PC_NAME_MAX")
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    name = len(os.fsencode(path.name))
    if name > name_max:
        raise ConfigError(
            f"{path.name[:40]}...: output name is {name} bytes; this file system allows "
            f"{name_max}. Choose a shorter name."
        )
    full = len(os.fsencode(str(path.resolve()))) + _TEMP_NAME_BYTES
    if full > path_max:
        raise ConfigError(
            f"output path is {full - _TEMP_NAME_BYTES} bytes; with milsparse's staging folder it "
            f"needs {full}, over this system's {path_max}. Choose a shorter path."
        )


def check_output_path(
    path, *, overwrite: bool, inputs=(), needed_bytes: int = 0, flag: str = "overwrite=True"
) -> Path:
    """Refuse, before any work, an output that cannot be written or would touch an input.

    The output must end in .mlpackage, have a name and path the file system can hold, lie in an
    existing, writable folder with room for `needed_bytes`, not be a symbolic link, and be
    neither an input, inside one, nor a folder holding one. An existing output is replaced only
    with `overwrite`, and only if it is an .mlpackage itself; `flag` is how the refusal names
    the way to allow it (`--force` on the command line).
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"{path}: output must end in .mlpackage")
    _check_length(path)
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; give the real output path")
    resolved = path.resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src:
            raise ConfigError("output is the input; milsparse never modifies its input")
        if _is_within(resolved, src):
            raise ConfigError(f"{path} is inside the input {source}; write the output elsewhere")
        if _is_within(src, resolved):
            raise ConfigError(f"{path} holds the input {source}; write the output elsewhere")
    if path.exists():
        _check_replaceable(path, overwrite, flag)
    parent = resolved.parent
    if not parent.exists():
        raise ConfigError(f"{path.parent}: output folder does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{path.parent} is not a folder")
    _check_writable(parent)
    if needed_bytes:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise ConfigError(
                f"{path.parent}: {free / 2**20:.1f} MiB free, the output (and the scratch "
                f"values beside it) needs up to "
                f"{needed_bytes / 2**20:.1f} MiB"
            )
    return path


def _check_replaceable(path: Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    if not overwrite:
        raise ConfigError(f"{path} exists; choose another path or allow overwriting ({flag})")
    if path.is_symlink() or not (path.is_dir() and (path / "Manifest.json").is_file()):
        raise ConfigError(f"{path} exists and is not an .mlpackage; it is not overwritten")


def _check_writable(folder: Path) -> None:
    """Create and remove a folder there: the only test that holds for root and read-only
    mounts alike (os.access says yes to root)."""
    try:
        probe = tempfile.mkdtemp(prefix=temp_prefix(".probe."), dir=folder)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot write there: {e.strerror}") from e


# -- atomic renames ---------------------------------------------------------------------------

_NOREPLACE, _EXCHANGE = "noreplace", "exchange"
# Linux renameat2 flags; macOS renamex_np flags.
_LINUX_FLAGS = {_NOREPLACE: 1, _EXCHANGE: 2}
_DARWIN_FLAGS = {_NOREPLACE: 0x4, _EXCHANGE: 0x2}


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def _rename_flagged(src: Path, dst: Path, how: str) -> bool:
    """Rename with RENAME_NOREPLACE or RENAME_EXCHANGE semantics; False when this system or
    file system has no such rename (the caller falls back), an OSError when it refused."""
    libc = _libc()
    if libc is None:
        return False
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), _DARWIN_FLAGS[how])
    elif hasattr(libc, "renameat2"):
        at_fdcwd = -100
        rc = libc.renameat2(
            at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _LINUX_FLAGS[how]
        )
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _appeared(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} appeared while milsparse was writing it (another run or program?); it was "
        "left as it is and nothing was written. Choose another path, or allow overwriting"
    )


def _move_new(staged_path: Path, path: Path) -> None:
    """Move a new package to a path nothing holds, refusing one that appeared meanwhile."""
    try:
        if _rename_flagged(staged_path, path, _NOREPLACE):
            return
    except FileExistsError as e:
        raise _appeared(path) from e
    # No flagged rename here. rename(2) of a folder refuses a non-empty folder or a file at the
    # destination, so only an empty folder could be replaced: nothing is lost with it.
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise _appeared(path)
    try:
        os.rename(staged_path, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(path) from e
        raise


def _replace_old(staged_path: Path, path: Path, staging: Path) -> None:
    """Put the new package at `path` in place of the old one; the old one ends in `staging`.

    At every instant `path` holds a complete package, or the old one lies in `staging` beside
    a note of where it belongs (which `remove_stale_temporaries` honours)."""
    if not os.path.lexists(path):
        return _move_new(staged_path, path)
    _check_replaceable(path, overwrite=True)
    try:
        if _rename_flagged(staged_path, path, _EXCHANGE):
            return  # the old package is now at staged_path, deleted with the staging folder
    except FileNotFoundError:  # the old package went away meanwhile: nothing to replace
        _move_new(staged_path, path)
        return
    (staging / _RESTORE_TO).write_text(path.name)
    backup = staging / _PREVIOUS
    os.replace(path, backup)
    try:
        _move_new(staged_path, path)
    except BaseException:
        os.replace(backup, path)
        raise
    (staging / _RESTORE_TO).unlink()


@contextlib.contextmanager
def staged(path: Path, *, overwrite: bool, finish=None):
    """Yield a path in a sibling temporary folder; on success it atomically becomes `path`.

    `finish(staged_path)` runs on the complete package before it moves. Without `overwrite`
    an output that appeared since the checks is left as it is (a ConfigError). On any failure
    the old package stays and nothing is left behind. A full disk or a folder that refuses
    writes is a ConfigError.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix("."), dir=path.parent))
    try:
        staged_path = staging / path.name
        try:
            yield staged_path
            if finish is not None:
                finish(staged_path)
        except OSError as e:
            if e.errno in _DISK_ERRORS:
                raise ConfigError(f"{path}: cannot write the output: {e.strerror}") from e
            raise
        try:
            _move_new(staged_path, path)
        except ConfigError:
            if not overwrite:
                raise
            _replace_old(staged_path, path, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- temporary folders ------------------------------------------------------------------------


def temp_prefix(prefix: str) -> str:
    return f"{prefix}{TEMP_TAG}{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _restore_previous(entry: Path) -> bool:
    """A staging folder of a dead run may hold an old package moved aside: put it back where it
    belongs if nothing took its place. True when the folder holds no package still needed."""
    note, backup = entry / _RESTORE_TO, entry / _PREVIOUS
    if not (note.is_file() and backup.is_dir()):
        return True
    try:
        name = note.read_text().strip()
        target = entry.parent / name
        if not name or os.sep in name or name in (".", ".."):
            return False
        if os.path.lexists(target):
            return True  # the new package made it into place; the old one may go
        os.rename(backup, target)
        return True
    except OSError:
        return False


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove temporary folders of milsparse processes that no longer run, after putting back
    any old package one of them had moved aside; return the folders removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        tag = entry.name.find(TEMP_TAG)
        if tag < 0 or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text = entry.name[tag + len(TEMP_TAG) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        if not _restore_previous(entry):
            continue  # could not put it back: never delete a user's package
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def spill_folder(output=None):
    """A temporary folder for the values passes spill (`milsparse.ir.blobs.Spill`): beside
    `output` (same file system: its bytes then move into the output file by reference or a
    kernel copy), or in the temporary folder. Removed on exit; a full disk is a ConfigError."""
    parent = Path(output).parent if output is not None else Path(tempfile.gettempdir())
    remove_stale_temporaries(parent)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(".spill."), dir=parent))
    try:
        yield folder
    except OSError as e:
        if e.errno in _DISK_ERRORS:
            raise ConfigError(f"{parent}: cannot write compressed values: {e.strerror}") from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
