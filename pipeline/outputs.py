"""One writer per output, and only its own temporaries (DESIGN 2.2; used by artifacts.py).

A writer *claims* an output path before it writes anything:

- it takes an exclusive ``flock`` on ``.<name>.lock`` beside the output, so a second writer of
  the same output (a hand-run stage during ``dvc repro``) fails at once with one message naming
  the holder, instead of interleaving; the lock file is removed when the claim ends;
- holding the lock, it removes only the temporaries beside the output whose owner is gone:
  temporaries are named ``.<name>.tmp-<pid>-<start time>-<random>``, so a live owner is told
  from a dead one (or from a recycled process id);
- it writes into its own temporary sibling and, before the final rename, checks that the
  temporary is still the folder it created (not deleted, or recreated by a library after a
  deletion) and that every nested output it finished inside is still there; else nothing is
  renamed and the error says what happened;
- running out of disk space inside a claim becomes a :class:`ResourceError` naming the output,
  what was written and what is free; nothing partial is left.

Dot-named temporaries and lock files are ignored by DVC (``.dvcignore``) and never become part
of an output.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import OutputError, ResourceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one writer is assumed
    fcntl = None  # type: ignore[assignment]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_OWNER = re.compile(r"(\d+)-(\d+)-")  # after ".<name>.tmp-": pid, start time


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0) would let
    another thread create a file world-writable in between)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public(path: Path, directory: bool) -> None:
    """Give a private temporary (mkdtemp 0700, mkstemp 0600) the modes the umask asks for."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def start_time(pid: int) -> int:
    """The start time of a process (clock ticks since boot; 0 where /proc is missing): with
    the pid it names one process, even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int, started: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return started == 0 or start_time(pid) in (0, started)


def _owner_alive(name: str) -> bool:
    """Whether the process named in a temporary's name still runs (legacy names: no)."""
    match = _OWNER.match(name)
    return bool(match) and _alive(int(match[1]), int(match[2]))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; return those created, deepest first."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Undo :func:`_make_parents` after a failure, keeping any folder that got content."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


class _Lock:
    """An exclusive, non-blocking ``flock`` on the lock file of an output."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = lock_file(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        while self.fd is None:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode(errors="replace").strip()
                os.close(fd)
                raise OutputError(
                    f"{self.path}: another process is writing this output "
                    f"({holder or 'its process id is not recorded yet'}); wait until it has "
                    "finished (or stop it), then run again"
                ) from None
            if _same(self.file, fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"process {os.getpid()}: {_command()}\n".encode())
                self.fd = fd
            else:  # the previous holder removed the file between our open and lock: retry
                os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.file.unlink(missing_ok=True)  # while still held: no one can lock a stale inode
            os.close(self.fd)
            self.fd = None


# The command line to name instead of /proc/self/cmdline: a child of the warm server
# (stages/warm.py) runs its client's command line under the server's.
COMMAND_WORDS: list[str] | None = None


def _command() -> str:
    """This process's command line (for the message of a writer that finds the lock held)."""
    try:
        words = COMMAND_WORDS or Path("/proc/self/cmdline").read_bytes().decode(
            errors="replace").split("\0")
    except OSError:
        return "?"
    return " ".join([Path(words[0]).name, *words[1:]]).strip()[:200]


def _same(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file or folder open as ``fd``. The open descriptor keeps
    the inode allocated, so a deleted and recreated folder never passes for the original."""
    try:
        st, held = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


@dataclass
class Claim:
    """One writer's hold on ``path``: its lock, its temporary sibling and what it made."""

    path: Path
    directory: bool
    tmp: Path = field(init=False)
    fd: int | None = field(init=False, default=None)  # the open temporary file (files only)
    expected_bytes: int = 0  # what the writers inside declared (for a disk-full message)
    lost_bytes: int = 0  # what nested writers had written when they gave up (same)
    _created: list[Path] = field(init=False, default_factory=list)
    _lock: _Lock = field(init=False)
    _handle: int | None = field(init=False, default=None)  # the temporary, held open
    _children: list[tuple[Path, int]] = field(init=False, default_factory=list)  # (path, fd)

    def open(self) -> Claim:
        self._created = _make_parents(self.path)
        self._lock = _Lock(self.path)
        try:
            self._lock.acquire()
        except BaseException:
            _remove_empty(self._created)
            raise
        try:
            self._remove_stale()
            prefix = f".{self.path.name}.tmp-{os.getpid()}-{start_time(os.getpid())}-"
            if self.directory:
                self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
                self._handle = os.open(self.tmp, os.O_RDONLY)
            else:
                self.fd, name = tempfile.mkstemp(prefix=prefix, dir=self.path.parent)
                self.tmp, self._handle = Path(name), self.fd
            public(self.tmp, self.directory)
        except BaseException:
            self._lock.release()
            _remove_empty(self._created)
            raise
        _register(self)
        return self

    def _remove_stale(self) -> None:
        """Temporaries of writers that died (only possible owners: we hold the lock)."""
        name = self.path.name
        for stale in self.path.parent.glob(f".{name}.tmp-*"):
            if not _owner_alive(stale.name[len(name) + 6:]):
                _remove(stale)
        for stale in self.path.parent.glob(f".{name}.old-*"):
            _remove(stale)

    def verify(self) -> None:
        """The temporary is the one this writer made, and what it finished inside is there."""
        assert self._handle is not None
        root = self.outermost()  # the output the user asked for, not a store inside it
        if not _same(self.tmp, self._handle):
            inside = "" if root is self else f" (while writing {self.path.relative_to(root.tmp)} in it)"
            raise OutputError(
                f"{root.path}: its temporary {root.tmp.name}{inside} was removed or replaced by "
                "another process while this one wrote it; nothing was written, run again"
            )
        for child, fd in self._children:
            if not _same(child, fd):
                raise OutputError(
                    f"{root.path}: {child.relative_to(root.tmp)} was removed from its temporary "
                    f"{root.tmp.name} by another process while this one wrote it; nothing was "
                    "written, run again"
                )

    def outermost(self) -> Claim:
        claim = self
        while (outer := _enclosing(claim)) is not None:
            claim = outer
        return claim

    def commit(self) -> None:
        """Verify, then rename the temporary into place (replacing what was there)."""
        try:
            self.verify()
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            if self.path.exists() or self.path.is_symlink():
                os.replace(self.path, old)
                os.replace(self.tmp, self.path)
                _remove(old)
            else:
                os.replace(self.tmp, self.path)
        except FileNotFoundError:
            self.discard()
            raise OutputError(f"{self.path}: its temporary {self.tmp.name} was removed by another "
                              "process before it was complete; nothing was written, run again"
                              ) from None
        except BaseException:
            self.discard()
            raise
        outer = _enclosing(self)
        if outer is not None:
            outer._children.append((self.path, os.open(self.path, os.O_RDONLY)))
        self._end()

    def discard(self) -> None:
        outer = _enclosing(self)
        if outer is not None:
            outer.lost_bytes += self.lost_bytes + _size(self.tmp)
        else:
            _DISCARDED.append(self.path)
        _remove(self.tmp)
        self._end()
        _remove_empty(self._created)

    def expect(self, nbytes: int) -> None:
        """Record what a writer declared it will write (for a disk-full message)."""
        claim: Claim | None = self
        while claim is not None:
            claim.expected_bytes += nbytes
            claim = _enclosing(claim)

    def _end(self) -> None:
        for fd in {self._handle, self.fd, *(fd for _, fd in self._children)} - {None}:
            os.close(fd)  # type: ignore[arg-type]
        self._handle = self.fd = None
        self._children = []
        _unregister(self)
        self._lock.release()

    def disk_full(self, err: OSError) -> ResourceError:
        """The one message for running out of disk space inside this claim (before discard)."""
        written = self.lost_bytes + _size(self.tmp)
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = 0
        need = f", the stores declared so far hold up to {human(self.expected_bytes)} " \
            "uncompressed" if self.expected_bytes else ""
        return ResourceError(
            f"out of disk space writing {self.path} ({err.strerror or err}): "
            f"{human(written)} written{need}, {human(free)} free on its disk; "
            "nothing was kept, free some space and run again"
        )


_ACTIVE: list[Claim] = []
_ACTIVE_LOCK = threading.Lock()
_DISCARDED: list[Path] = []  # outermost outputs given up since the process started


def _register(claim: Claim) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.append(claim)


def _unregister(claim: Claim) -> None:
    with _ACTIVE_LOCK:
        if claim in _ACTIVE:
            _ACTIVE.remove(claim)


def _enclosing(claim: Claim) -> Claim | None:
    """The active claim whose temporary holds ``claim``'s output, if any."""
    for other in list(_ACTIVE):
        if other is not claim and other.directory and other.tmp in claim.path.parents:
            return other
    return None


def outputs_in_progress() -> list[Path]:
    """The outermost outputs being written now, else the last ones given up (for messages)."""
    with _ACTIVE_LOCK:
        active = [c.path for c in _ACTIVE if _enclosing(c) is None]
    return active or list(dict.fromkeys(_DISCARDED))


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total if path.is_dir() else (path.stat().st_size if path.exists() else 0)


def human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover


# --- folders named on the command line (--out) -------------------------------------------------

MARKER = ".cmds-ad-output"  # in every folder a command writes: names the command


def mark(folder: Path, command: str) -> None:
    """Record in a folder being written that ``cmds-ad <command>`` wrote it."""
    (folder / MARKER).write_text(f"written by cmds-ad {command}\n")


def _written_by(folder: Path, command: str) -> bool:
    """The folder is empty or holds this command's marker."""
    try:
        return (folder / MARKER).read_text().split()[-1:] == [command]
    except OSError:
        return not any(folder.iterdir())


def check_out_folder(out: Path, command: str, force: bool,
                     protected: Collection[tuple[str, Path | None]] = ()) -> None:
    """Refuse an output folder that would replace what this command did not write.

    Never (not even with ``force``): the current folder, the home folder, a ``protected``
    folder (e.g. the data root) or a folder holding any of them (the file-system root too).
    Without ``force``: an existing folder that holds files this command did not write (no
    marker of it).
    """
    target, here = out.resolve(), Path.cwd().resolve()
    never = [("the current folder", here), ("your home folder", Path.home().resolve()),
             *((what, p.resolve()) for what, p in protected if p is not None)]
    for what, folder in never:
        if target == folder or target in folder.parents:
            reason = f"it is {what}" if target == folder else f"it holds {what} ({folder})"
            raise OutputError(f"{out}: refused as an output folder: {reason}, which the output "
                              "would replace; give a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists and is not a folder; give a new folder for the output")
    if out.is_dir() and not force and not _written_by(out, command):
        found = sorted(p.name for p in out.iterdir())
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise OutputError(f"{out}: the folder holds files that `cmds-ad {command}` did not write "
                          f"({listed}); the output would replace them. Give a new or empty "
                          "folder, or pass --force to replace it")
