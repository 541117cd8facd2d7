"""One writer per run folder: a lock file that works on a shared file system.

``pretrain`` and ``eval-all`` hold ``<folder>/run.lock`` while they write into ``<folder>``; a second
process on the same folder stops at once with one line naming the holder (host, pid, start time) and the
fix, before it has touched anything there.

How it is made safe without ``flock`` (which NFS and Lustre honour only partly):

- **Creation** is a hard link: the lock's content is written to a file of our own beside it, then
  ``os.link``-ed to ``run.lock``. ``link`` fails if the name exists, atomically, on local disks and on
  NFS alike (the classic NFS lock recipe); when the server's reply is lost, the link count of our own
  file (2) still tells whether it worked.
- **Liveness** is a heartbeat: a daemon thread rewrites the lock every ``HEARTBEAT_S`` seconds. Its age is
  measured with the file server's clock (the mtime of a probe file written now minus the lock's mtime),
  so clocks that disagree between hosts do not matter.
- **A holder is gone** when it ran on this host and its pid no longer runs (or runs another program:
  the process start time is recorded), or, on another host, when its heartbeat is older than
  ``stale_after_s`` (``DINO_LOCK_STALE_MINUTES``, default 10 minutes). Its lock is then taken over, with a
  warning. A SLURM job requeued under the same job id takes over its own lock (unless its previous
  instance still runs on this very host).
- **Replacing** a lock (a takeover, a heartbeat) happens under a short mutex, ``run.lock.mutex``, itself
  created by a link, so two processes that both find a stale lock cannot both take it, and a heartbeat
  cannot overwrite a lock that was just taken over. A holder that finds its lock taken stops at its next
  check (`RunLock.assert_held`) instead of writing beside the new holder.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .atomic import atomic_write_text
from .errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
MUTEX_STALE_S = 60.0  # a takeover mutex older than this was left by a killed process


def stale_after_default() -> float:
    """Seconds without a heartbeat after which a holder on another host counts as gone."""
    minutes = os.environ.get("DINO_LOCK_STALE_MINUTES", "10")
    try:
        value = float(minutes)
    except ValueError:
        raise UserError(f"DINO_LOCK_STALE_MINUTES='{minutes}' is not a number of minutes: set it to e.g. 10") from None
    if value <= 0:
        raise UserError(f"DINO_LOCK_STALE_MINUTES={minutes} must be positive: set it to e.g. 10")
    return value * 60.0


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if unknown or not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces


def pid_running(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` runs on this host and, when its start time is known, is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    if start_ticks is None:
        return True
    now = process_start_ticks(pid)
    return now is None or now == start_ticks


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says."""

    host: str
    pid: int
    started: str  # ISO time of the acquisition, the holder's clock
    purpose: str  # "pretrain", "eval-all"
    token: str  # unique per acquisition
    pid_start: int | None = None
    slurm_job: str | None = None

    @classmethod
    def me(cls, purpose: str) -> "Holder":
        return cls(host=socket.gethostname(), pid=os.getpid(), started=datetime.now().isoformat(timespec="seconds"),
                   purpose=purpose, token=uuid.uuid4().hex, pid_start=process_start_ticks(os.getpid()),
                   slurm_job=slurm_job_id())

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.purpose} on host {self.host}, pid {self.pid}{job}, started {self.started}"


def slurm_job_id() -> str | None:
    """The SLURM job (array jobs: job_task), the same after a requeue; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def _read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when the file is gone. An unreadable lock (a torn write) reads as an old
    holder with an unknown pid, so it becomes stale like any other."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        return Holder(**{k: fields.get(k) for k in Holder.__dataclass_fields__})
    except (ValueError, TypeError):
        return Holder(host="?", pid=-1, started="?", purpose="?", token="unreadable:" + text[:32])


def _link_new(path: Path, content: str) -> bool:
    """Create ``path`` holding ``content`` only if it does not exist (atomic, NFS-safe); True if created."""
    own = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    own.write_text(content)
    try:
        try:
            os.link(own, path)
        except FileExistsError:
            return False
        except OSError as error:
            if own.stat().st_nlink == 2:  # a lost server reply: the link was made
                return True
            if error.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                return _create_exclusive(path, content)  # a file system without hard links
            raise
        return True
    finally:
        own.unlink(missing_ok=True)


def _create_exclusive(path: Path, content: str) -> bool:
    """``O_EXCL`` creation, for file systems without hard links (atomic on local disks and NFSv3+)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return True


def _server_age(path: Path) -> float | None:
    """Seconds since ``path`` was last written, by the file server's clock; None if it is gone."""
    probe = path.with_name(f".{path.name}.probe.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        probe.write_text("")
        now = probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return None


class _Mutex:
    """A short critical section over the lock file (created by link; a leftover older than a minute is
    removed)."""

    def __init__(self, lock_path: Path):
        self.path = lock_path.with_name(lock_path.name + ".mutex")

    def __enter__(self):
        deadline = time.monotonic() + 10.0
        while not _link_new(self.path, f"{socket.gethostname()} {os.getpid()}"):
            age = _server_age(self.path)
            if age is not None and age > MUTEX_STALE_S:
                self.path.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise UserError(f"'{self.path}' has been held for over 10 s: if no run uses this folder, delete it")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


class RunLock:
    """The lock of one run folder, held from `acquire` to `release` (or the ``with`` block's end)."""

    def __init__(self, folder: Path, holder: Holder, heartbeat_s: float):
        self.folder, self.path, self.holder = folder, folder / LOCK_NAME, holder
        self.heartbeat_s = heartbeat_s
        self.lost_to: Holder | None = None
        self.created_folders: list[Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking it
    @classmethod
    def acquire(cls, folder, purpose: str, *, stale_after_s: float | None = None,
                heartbeat_s: float = HEARTBEAT_S, warn=None) -> "RunLock":
        """Take the lock of ``folder`` (created if missing) for ``purpose``, or raise `UserError` naming
        its holder (or why the folder cannot be written). A gone holder's lock is taken over; ``warn``
        (default: stderr) gets one line saying so."""
        folder = Path(folder)
        stale_after_s = stale_after_default() if stale_after_s is None else stale_after_s
        warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        try:
            return cls._take(folder, purpose, stale_after_s, heartbeat_s, warn)
        except OSError as error:
            raise UserError(f"cannot write in the output folder '{folder}' ({error.strerror or error}): choose a "
                            "folder you can write to") from None

    @classmethod
    def _take(cls, folder: Path, purpose: str, stale_after_s: float, heartbeat_s: float, warn) -> "RunLock":
        created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        lock = cls(folder, Holder.me(purpose), heartbeat_s)
        lock.created_folders = created  # removed again at release if they are still empty
        content = json.dumps(asdict(lock.holder))
        for _ in range(20):  # each pass: create, or judge the holder found (it may leave meanwhile)
            if _link_new(lock.path, content):
                lock._start_heartbeat()
                return lock
            holder = _read_holder(lock.path)
            if holder is None:
                continue
            reason = lock._why_gone(holder, stale_after_s)
            if reason is None:
                raise UserError(f"run folder '{folder}' is in use by {holder.describe()} (lock file "
                                f"'{lock.path}'): wait for it to finish, or choose another output folder; if "
                                f"that process is gone (another host's lock is taken over after "
                                f"{stale_after_s / 60:g} minutes without a heartbeat), delete the lock file")
            with _Mutex(lock.path):
                if _read_holder(lock.path) != holder:  # changed meanwhile (released, or taken by another)
                    continue
                atomic_write_text(lock.path, content)
            warn(f"warning: taking over the lock of '{folder}' from {holder.describe()}: {reason}")
            lock._start_heartbeat()
            return lock
        raise UserError(f"could not take the lock '{lock.path}': it keeps changing hands; is another run "
                        "starting on this folder?")

    def _why_gone(self, holder: Holder, stale_after_s: float) -> str | None:
        """Why ``holder`` no longer holds the folder, or None when it may still be writing."""
        here = holder.host == self.holder.host
        if here and holder.pid == self.holder.pid and holder.pid_start == self.holder.pid_start:
            return None  # this very process holds it already: a second acquisition is a bug, refuse it
        alive_here = here and pid_running(holder.pid, holder.pid_start)
        if holder.slurm_job and holder.slurm_job == self.holder.slurm_job and not alive_here:
            return f"SLURM job {holder.slurm_job} was requeued and takes over its own lock"
        if here:
            return None if alive_here else f"pid {holder.pid} no longer runs on this host"
        age = _server_age(self.path)
        if age is None:
            return "it was released"
        if age > stale_after_s:
            return f"no heartbeat for {age / 60:.1f} minutes (limit {stale_after_s / 60:g})"
        return None

    # ------------------------------------------------------------------ holding it
    def _start_heartbeat(self) -> None:
        if self.heartbeat_s <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name=f"run-lock {self.folder}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except (OSError, UserError):
                pass  # a file-system hiccup or a mutex held for long: the next beat retries; a long one makes
                # the lock stale
            if self.lost_to is not None:
                return

    def _still_ours(self) -> bool:
        """Read the lock file: True if it still names this holder, else record who took it (`lost_to`)."""
        current = _read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            return True
        self.lost_to = current or Holder(host="?", pid=-1, started="?", purpose="(lock deleted)", token="")
        return False

    def heartbeat(self) -> None:
        """Rewrite the lock (its mtime is the heartbeat), unless another process has taken it over."""
        with _Mutex(self.path):
            if self._still_ours():
                atomic_write_text(self.path, json.dumps(asdict(self.holder)))

    def assert_held(self) -> None:
        """Raise `UserError` if another process has taken the lock over (this one must stop writing)."""
        if self.lost_to is None:
            self._still_ours()
        if self.lost_to is not None:
            raise UserError(f"the lock of '{self.folder}' was taken over by {self.lost_to.describe()} (this "
                            "process's heartbeat was too old): stopping so that only one process writes there")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours, and the folders `acquire` created if
        nothing else was written there (a run refused for bad input leaves no empty folder behind)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with _Mutex(self.path):
                current = _read_holder(self.path)
                if current is not None and current.token == self.holder.token:
                    self.path.unlink(missing_ok=True)
        except (OSError, UserError):
            pass  # left behind: the next run finds it stale
        for folder in self.created_folders:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote there

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
