"""One writer per artifact folder: an exclusive lock for the write stages (export, calibrate, build).

A write stage holds ``ART/.uniref.lock`` (``flock``) for its whole run; a second writer is refused at once with a
message naming the holder's pid and stage. Readers (edit, serve, inspect) never take it: every file a reader can
reach is either complete or not yet referenced by the manifest. While the lock is held, leftovers of killed runs
(temporary files and folders named with ``TEMP_PREFIX``, staging folders the manifest does not reference) are
removed, on entry and on exit. The lock is re-entrant within a process, so ``compile`` can call every stage.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .errors import InputError, ManifestError, UnirefError
from .fileio import TEMP_PREFIX

logger = logging.getLogger(__name__)

LOCK_NAME = ".uniref.lock"
STAGING_PREFIX = ".uniref-gen-"  # a new generation of graphs written beside the live one (runtime/generation.py)

_held: dict[str, int] = {}  # resolved folder -> re-entry depth in this process

F = TypeVar("F", bound=Callable)


class ArtifactLockedError(UnirefError):
    """Another process is writing the artifact folder (exit code 2)."""


def writable_folder(art_dir: str | os.PathLike, create: bool = True) -> Path:
    """Check ``art_dir`` is a writable folder, creating it first when ``create`` is set.

    Raises:
        InputError: the path is a file, sits under a file, or cannot be created or written.
        ManifestError: ``create`` is off and the folder does not exist.
    """
    root = Path(art_dir)
    if not create and not root.is_dir():
        raise ManifestError(f"'{root}' is not an artifact folder (it does not exist).",
                            "pass a folder written by `uniref-deploy export` or `compile`.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"'{root}' exists and is not a folder.", "pass a folder for the artifacts.") from None
    except OSError as err:
        raise InputError(f"Cannot create the artifact folder '{root}': {err.strerror or err}.",
                         "pick a writable location.") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise InputError(f"The artifact folder '{root}' is not writable.", "fix its permissions or pick another folder.")
    return root


@contextmanager
def artifact_lock(art_dir: str | os.PathLike, stage: str, create: bool = False,
                  cleanup: bool = True) -> Iterator[Path]:
    """Hold the write lock of ``art_dir`` for ``stage``; yields the folder. With ``create`` (export) a missing
    folder is made, and removed again if the stage leaves it empty. ``cleanup`` removes stale temporary files on
    entry and exit (off for a runtime that only adds a record to the manifest: it leaves the folder as it was).

    Raises:
        ArtifactLockedError: another process holds the lock.
        InputError: the folder cannot be created or written.
        ManifestError: the folder does not exist and ``create`` is off.
    """
    created = create and not Path(art_dir).exists()
    root = writable_folder(art_dir, create)
    key = str(root.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield root
        finally:
            _held[key] -= 1
        return
    import fcntl

    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"Cannot create the lock file '{path}': {err.strerror or err}.",
                         "the artifact folder must be writable.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise ArtifactLockedError(
                f"'{root}' is being written by another process ({holder}).",
                "wait for it to finish, then run this again.",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "stage": stage}).encode(), 0)
        _held[key] = 1
        try:
            if cleanup:
                remove_stale_temp(root)
            yield root
        finally:
            del _held[key]
            if cleanup:
                remove_stale_temp(root)
            os.ftruncate(fd, 0)
            if created and [p.name for p in root.iterdir()] == [LOCK_NAME]:  # a stage that wrote nothing
                path.unlink()
                root.rmdir()
    finally:
        os.close(fd)  # closing releases the flock


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{info.get('stage', 'a write stage')}, pid {int(info['pid'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def holds_lock(art_dir: str | os.PathLike) -> bool:
    """True when this process holds the write lock of ``art_dir``."""
    return str(Path(art_dir).resolve()) in _held


def writes_artifacts(stage: str, arg: str = "art_dir", create: bool = False) -> Callable[[F], F]:
    """Decorator: run the stage function under ``artifact_lock`` of its argument named ``arg``."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            art = signature.bind_partial(*args, **kwargs).arguments[arg]
            with artifact_lock(art, stage, create):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap


def remove_stale_temp(root: Path) -> list[Path]:
    """Remove temp files/folders (``TEMP_PREFIX``) in ``root`` and its subfolders, and staging folders the manifest
    does not use.

    Only call with the lock held: then no other writer can own them. Returns what was removed.
    """
    referenced = _referenced_staging(root)
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            stale = name.startswith(TEMP_PREFIX) or (name.startswith(STAGING_PREFIX) and here == root
                                                     and name not in referenced)
            if not stale:
                continue
            target = here / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            removed.append(target)
        depth = len(here.relative_to(root).parts)  # stages write at most one folder deep (onnx/, engines/, ...)
        dirnames[:] = [d for d in dirnames if depth < 1 and (here / d).exists() and not (here / d).is_symlink()]
    if removed:
        logger.info("removed %d leftover temporary file(s) under %s", len(removed), root)
    return removed


def _referenced_staging(root: Path) -> set[str]:
    """Staging folders named by the manifest's graph files (a run killed between its two manifest saves)."""
    try:
        data = json.loads((root / "manifest.json").read_bytes())
        files = [g.get("file", "") for g in data.get("graphs", ())]
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return {f.split("/", 1)[0] for f in files if isinstance(f, str) and f.startswith(STAGING_PREFIX)}
