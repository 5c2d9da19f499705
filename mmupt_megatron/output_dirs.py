"""Output folders we may write, replace or delete: only what mmupt itself wrote, never an input; one run at a time.

    check_apart(out, {"--hf": hf_dir}, out_label="--out")   # out is not, inside, or around an input
    prepare_owned_dir(out, kind="hf-to-megatron", force=True, out_label="--out")
    lock = RunLock.take(out_dir, label="trainer.output_dir")  # refused while another live run holds the folder
    lock.release()

Every command that writes checks its outputs against its inputs before any work: ``convert`` (--out vs --hf /
--ckpt), ``eval`` (the report vs --data, --images, --model), ``synthesize`` (OUT and its summary vs --input,
--model), ``train`` (``trainer.output_dir``, its checkpoints, plots and hf export vs ``model.path`` and the data
files: ``check_run_apart``).

A folder mmupt writes gets an ownership marker (``.mmupt-output``, JSON: what wrote it) as its first file;
``--force`` / a re-run replaces a folder only when it carries that marker, and never while a run holds its
lock (``.mmupt.lock``: the owner's host and pid, created exclusively and ``flock``ed for the run's life; a lock
left by a dead process of this host is taken over with a warning). Plain files, no framework imports.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import weakref
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Self

OWNER_FILE = ".mmupt-output"
LOCK_FILE = ".mmupt.lock"

logger = logging.getLogger(__name__)


def _input_path(spec: str | Path) -> Path:
    """An input as the path it reads: ``FOLDER@SPLIT`` (a dataset folder's split) is ``FOLDER``."""
    path = Path(spec)
    text = str(spec)
    if not path.exists() and "@" in text and Path(text.rsplit("@", 1)[0]).exists():
        path = Path(text.rsplit("@", 1)[0])
    return path.resolve()


def check_apart(out: str | Path, inputs: dict[str, str | Path | None], *, out_label: str,
                inside_ok: tuple[str, ...] = ()) -> None:
    """ValueError if ``out`` is one of ``inputs``, sits inside one, or contains one (any of those would
    write into, or on --force delete, what the user gave us to read). A None input is not given; ``out`` may lie
    inside the inputs labelled in ``inside_ok`` (a new file there harms nothing: a model folder)."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        if path is None or str(path) == "":
            continue
        source = _input_path(path)
        if target == source:
            raise ValueError(f"{out_label} {out} is the input {label} {path} itself: choose another {out_label}")
        if source in target.parents and label not in inside_ok:
            raise ValueError(f"{out_label} {out} lies inside the input {label} {path}: choose a folder outside it")
        if target in source.parents:
            raise ValueError(f"{out_label} {out} contains the input {label} {path}: choose a folder that does not")


def check_run_apart(out_dir: str | Path, inputs: dict[str, str | Path | None], *, written: Iterable[str],
                    out_label: str = "trainer.output_dir") -> None:
    """ValueError if a run's folder ``out_dir`` is an input or lies inside one, or if one of the entries the run
    writes (and replaces: ``written``, names in ``out_dir``) is, contains or lies inside an input. ``out_dir``
    may hold inputs elsewhere (``OUT/data/train.parquet`` next to ``OUT/checkpoints``)."""
    target = Path(out_dir).resolve()
    for label, path in inputs.items():
        if path is None or str(path) == "":
            continue
        source = _input_path(path)
        if target == source or source in target.parents:
            where = "is" if target == source else "lies inside"
            raise ValueError(f"{out_label}={out_dir} {where} the input {label}={path}: the run would write its "
                             f"checkpoints, plots and hf export there; choose a {out_label} outside it")
        for name in written:
            entry = target / name
            if entry == source or entry in source.parents:
                raise ValueError(f"{out_label}={out_dir}: the run writes and replaces {entry}, which "
                                 f"{'is' if entry == source else 'holds'} the input {label}={path}: choose another "
                                 f"{out_label} or move the input")


def mark_owned(folder: str | Path, *, kind: str) -> None:
    """Record that mmupt (``kind``: what wrote it) owns ``folder``."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps({"written_by": f"mmupt {kind}", "created": time.time()}) + "\n")


def is_owned(folder: str | Path) -> bool:
    return (Path(folder) / OWNER_FILE).is_file()


def remove_owned(folder: str | Path, *, out_label: str) -> None:
    """Delete ``folder`` if mmupt wrote it (it has the marker) and no live run holds it; ValueError otherwise."""
    path = Path(folder)
    if not path.is_dir() or path.is_symlink() or not is_owned(path):
        raise ValueError(
            f"{out_label} {folder} is not empty and was not written by mmupt (no {OWNER_FILE} marker): it is "
            f"never deleted, not even with --force; remove it yourself or choose another {out_label}"
        )
    holder = lock_holder(path)
    if holder is not None:
        raise ValueError(f"{out_label} {folder} is in use by a running training ({_describe(holder)}): it is not "
                         f"deleted; wait for that run to finish or choose another {out_label}")
    shutil.rmtree(path)


def prepare_owned_dir(out: str | Path, *, kind: str, force: bool, out_label: str) -> Path:
    """An empty ``out`` marked as ours. A non-empty ``out`` is an error, unless ``force`` and mmupt wrote it
    (then it is replaced)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{out_label} {out} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ValueError(f"{out_label} {out} is not empty; pass --force to replace a previous mmupt output")
        remove_owned(path, out_label=out_label)
    try:
        path.mkdir(parents=True, exist_ok=True)
        mark_owned(path, kind=kind)
    except OSError as error:
        raise ValueError(f"{out_label} {out} cannot be written: {error.strerror or error}") from None
    return path


# -- one run per folder -------------------------------------------------------------------------------------------
def _read_owner(fd: int) -> dict | None:
    """The owner record of the lock file open as ``fd``; None when empty or unreadable (being written, or a crash
    while it was)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "owner unknown: its lock file is being written or is damaged"
    return f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('started')}"


_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)
"""flock's errors on a filesystem that does not support it (Lustre mounted without -o flock, some NFS)."""


def _try_flock(fd: int, *, wait_s: float = 0.0) -> bool | None:
    """True: locked; False: another open file holds it (after ``wait_s``); None: no flock on this filesystem
    (then the owner record alone decides: created exclusively, taken over only from a dead pid)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno in _NO_FLOCK:
                return None
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing run unlinks it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _may_be_alive(owner: dict | None) -> bool:
    """Whether the process an owner record names may still run (another host's cannot be checked)."""
    if not owner:
        return False
    pid = owner.get("pid")
    return owner.get("host") != socket.gethostname() or (isinstance(pid, int) and _process_alive(pid))


def lock_holder(folder: str | Path) -> dict | None:
    """The owner record of a live lock on ``folder`` (``{}`` if unreadable), None when no run holds it."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        locked = _try_flock(fd)
        if locked is None:  # no flock here: the record decides
            owner = _read_owner(fd)
            return owner if _may_be_alive(owner) else None
        return None if locked else (_read_owner(fd) or {})
    finally:
        os.close(fd)


_HELD: set[Path] = set()
"""The lock files this process holds (refused a second time even where the filesystem has no flock)."""


def _release(path: Path, fd: int, pid: int) -> None:
    if os.getpid() != pid:  # a forked child inherits the finalizer, not the lock
        return
    _HELD.discard(path)
    try:
        if _same_file(fd, path):
            path.unlink()  # while still flocked: a waiter on this file sees it unlinked and starts over
    except OSError:
        pass  # left behind, it is a stale lock: the next run takes it over
    finally:
        os.close(fd)  # releases the flock


class RunLock:
    """``.mmupt.lock`` in a run's folder, held (``flock``) until ``release``, the end of this process, or the
    lock object's collection; then the file is removed. ``take`` refuses a folder another live run holds."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, _release, path, fd, os.getpid())

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @classmethod
    def take(cls, folder: str | Path, *, label: str = "trainer.output_dir") -> RunLock:
        """Hold ``folder`` (created if missing) for this process. ValueError naming the owner's host and pid when
        another live run holds it, or when a lock's owner cannot be known to be gone (another host, or a live
        pid of this host); a lock left by a dead process of this host is taken over (logged as a warning)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        if path.resolve() in _HELD:
            raise ValueError(f"{label}={folder} is in use by another training run of this process (pid "
                             f"{os.getpid()}; lock {path}): release it first, or choose another {label}")
        for _ in range(20):
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                # a run that just created the file waits a moment for one that is only reading it
                if _try_flock(fd, wait_s=2.0 if created else 0.0) is False:
                    owner = _describe(_read_owner(fd))
                    raise ValueError(f"{label}={folder} is in use by another training run ({owner}; lock {path}): "
                                     f"wait for it to finish, or choose another {label}")
                if not _same_file(fd, path):  # its holder released (unlinked) it while we opened it
                    os.close(fd)
                    continue
                if not created:
                    _check_stale(_read_owner(fd), path=path, folder=folder, label=label)
                record = {"host": socket.gethostname(), "pid": os.getpid(),
                          "started": datetime.now().isoformat(timespec="seconds")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            _HELD.add(path.resolve())
            return cls(path.resolve(), fd)
        raise ValueError(f"{label}={folder}: its lock {path} keeps changing hands: is another run starting there?")


def _check_stale(owner: dict | None, *, path: Path, folder: Path, label: str) -> None:
    """A lock file no process holds: ValueError unless its owner is known to be gone; else a warning."""
    if owner is not None:
        host, pid = owner.get("host"), owner.get("pid")
        if host != socket.gethostname():
            raise ValueError(f"{label}={folder} has the lock of a run on another host ({_describe(owner)}; lock "
                             f"{path}): if that run is over, delete {path}; else choose another {label}")
        if isinstance(pid, int) and pid != os.getpid() and _process_alive(pid):
            raise ValueError(f"{label}={folder} has the lock of process {pid}, which is alive on this host "
                             f"({_describe(owner)}; lock {path}): if it is not an mmupt run, delete {path}; else "
                             f"wait for it to finish or choose another {label}")
    logger.warning("%s=%s: taking over the lock %s left by a run that is gone (%s)", label, folder, path,
                   _describe(owner))
