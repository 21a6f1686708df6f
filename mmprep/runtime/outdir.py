"""The output folder of a job, local or on any filesystem: lock, run identity, finished-chunk records, owned files.

One class for every location (:class:`~mmprep.runtime.storage.Location`); where the folder is local it also

- holds an exclusive lock (``.mmprep/lock``) for the whole run, so two runs never write into one folder;
- checks a finished chunk's file by size **and** sha256 before ``--resume`` keeps it (remote: by size, since
  hashing would download every shard);
- never writes through a symbolic link (the lock, the state folder, records, outputs).

Layout of the state folder ``.mmprep/``: ``lock``, ``run.json`` (the run identity: what decides the output),
``files.json`` (every final file the last finished run published), ``chunks/NNNNN.json`` (one record per finished
chunk, with the files it wrote). ``--overwrite`` deletes exactly the files those records name, never a folder and
never a file mmprep did not write.

Scopes (one per split of a packed dataset): an ``OutputDir`` with ``scope="train"`` keeps its state in
``.mmprep/splits/train/`` (the same three records) and shares the lock. The files other scopes wrote are left
alone (a second split is added to a folder without ``--overwrite``); ``shared_names`` (``index.json``,
``README.md``) are files every scope rewrites: they are recorded in ``.mmprep/shared.json``, never deleted with a
scope's files, and one that exists without that record (a user's ``README.md``) stops the run. In a ``guarded``
folder (``data/``, which trainers read whole) any file that no scope wrote stops the run, ``--overwrite`` or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprep.errors import InputError, RunFailed, UsageError
from mmprep.runtime.files import TEMP_MARK, ensure_dir, is_temp_name
from mmprep.runtime.storage import Location

__all__ = ["STATE_DIR", "ChunkEntry", "OutputDir", "identity_diff"]

STATE_DIR = ".mmprep"
_RUN = "run.json"
_FILES = "files.json"
_CHUNKS = "chunks"
_SCOPES = "splits"
_SHARED = "shared.json"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class ChunkEntry:
    """A finished chunk's record as stored: the job's record (JSON) and the files the chunk wrote."""

    record: dict[str, Any]
    files: tuple[str, ...] = ()


def identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two run identities differ (``config.image.size``, ``tokenizer_sha256``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += identity_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "identity"]


@dataclass
class OutputDir:
    """A job's output folder.

    Args:
        loc: where (local or remote).
        resume: keep the finished chunks of an earlier run with the same identity.
        overwrite: delete the files an earlier run wrote (by exact name) first.
        fixed_names: final files the job always publishes (``index.json``, ...): their leftover temporary files
            are removed at start.
        temp_owner: whether a final name is one of the job's (its temporary siblings are removed at start).
        kind: what the folder holds, for messages (``packed dataset``).
        describe: how a differing identity key is shown (``--image-size: 224x224 -> 64x64``).
        scope: this run's part of a folder several runs share (a split): state in ``.mmprep/splits/<scope>/``,
            other scopes' files left alone (see the module docstring). None: the run owns the whole folder.
        shared_names: files every scope rewrites (recorded apart, never deleted with a scope's files).
        guarded: folders where a file no scope wrote stops the run.
        scope_of: the scope a file in a guarded folder would belong to by its name (a file a killed run wrote
            before recording it), None when none.
    """

    loc: Location
    resume: bool = False
    overwrite: bool = False
    fixed_names: tuple[str, ...] = ()
    temp_owner: Callable[[str], bool] = field(default=lambda name: False)
    kind: str = "output"
    describe: Callable[[str, Any, Any], str] = field(default=lambda key, old, new: f"{key} ({old!r} -> {new!r})")
    scope: str | None = None
    shared_names: tuple[str, ...] = ()
    guarded: tuple[str, ...] = ()
    scope_of: Callable[[str], str | None] = field(default=lambda name: None)
    _lock_fd: int | None = field(default=None, init=False, repr=False)
    _published: set[str] = field(default_factory=set, init=False, repr=False)
    _shared: set[str] = field(default_factory=set, init=False, repr=False)

    # -- paths --------------------------------------------------------------------------------------------------
    @property
    def local(self) -> bool:
        return self.loc.local

    def child(self, name: str) -> Location:
        return self.loc.child(name)

    def _state(self, name: str = "", scope: str | None = None) -> Location:
        """A file of the state folder of this run's scope (of ``scope`` when given; ``""``: the unscoped one)."""
        scope = self.scope if scope is None else scope
        base = f"{STATE_DIR}/{_SCOPES}/{scope}" if scope else STATE_DIR
        return self.loc.child(f"{base}/{name}" if name else base)

    def _top_state(self, name: str) -> Location:
        return self.loc.child(f"{STATE_DIR}/{name}")

    def __str__(self) -> str:
        return str(self.loc)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def open(self, identity: dict[str, Any]) -> None:
        """Create and lock the folder, check the identity against an earlier run (``resume``) or clear the earlier
        run's files (``overwrite``), and record the identity.

        Raises:
            UsageError: a non-empty folder without ``--resume``/``--overwrite``, another run holding the lock, a
                different identity on ``--resume``, a symbolic link where mmprep writes.
            RunFailed: the folder cannot be prepared (disk full, permissions).
        """
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        try:
            self._open(identity)
        except (UsageError, RunFailed, InputError):
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise RunFailed(f"{self.loc}: cannot prepare the output directory: {self.loc.scrub(str(exc))}",
                            hint="check free disk space and permissions of the output directory") from None

    def _open(self, identity: dict[str, Any]) -> None:
        if self.local:
            self._prepare_local()
        if self.scope is not None:
            self._open_scoped(identity)
            return
        try:
            existing = self.loc.list_names()
            old = self._read_state_json(_RUN)
            owned = self._earlier_files()
        except OSError as exc:
            raise UsageError(f"{self.loc}: cannot read the output location: {self.loc.scrub(str(exc))}",
                             hint="check the URI, the storage credentials and permissions") from None
        visible = [n for n in existing if n != STATE_DIR and not self._is_our_temp(n)]
        if self.resume:
            if old is None:
                if owned or any(self.temp_owner(n) for n in visible):
                    raise UsageError(f"{self.loc}: has output files but no run record to resume from",
                                     hint="rerun with --overwrite to start again")
            elif old != identity:
                raise self._mismatch(old, identity, "")
        else:
            if visible and not self.overwrite:
                raise UsageError(f"{self.loc}: output directory is not empty",
                                 hint="pass --resume to continue an interrupted run or --overwrite to replace it")
            self._delete_earlier(owned if visible else set())
        self._remove_temps()  # left by a killed run
        published = self._read_state_json(_FILES) if self.resume else None
        self._published = {n for n in published if isinstance(n, str)} if isinstance(published, list) else set()
        self._write_state(_RUN, identity)

    def _open_scoped(self, identity: dict[str, Any]) -> None:
        """:meth:`_open` for a scope: this scope's files are checked as a whole folder's would be; other scopes'
        files and the recorded shared files are left alone; a foreign file in a guarded folder stops the run."""
        what = f"{self.kind} '{self.scope}'"
        try:
            names = self._visible_names()
            old = self._read_state_json(_RUN)
            owned = self._earlier_files()
            legacy = self._earlier_files(scope="")
            others = self._other_scopes_files()
            shared = self._read_shared()
        except OSError as exc:
            raise UsageError(f"{self.loc}: cannot read the output location: {self.loc.scrub(str(exc))}",
                             hint="check the URI, the storage credentials and permissions") from None
        if legacy or self._top_state(_RUN).size() is not None:
            if self.resume or not self.overwrite:
                raise UsageError(f"{self.loc}: holds output of an earlier mmprep format (one unnamed part)",
                                 hint="use --overwrite to replace it, or choose another --out")
            owned |= legacy
            published = self._read_state_json(_FILES, scope="")  # its index.json: replaced, so deleted now
            owned |= {n for n in published or [] if isinstance(n, str) and n in self.shared_names}
        scopes = set(self._scopes()) | {self.scope}

        def claimed(name: str) -> bool:  # recorded, or named as a known scope's file (a killed run's last file)
            return name in owned or name in others or self.scope_of(name.rsplit("/", 1)[-1]) in scopes

        foreign_guarded = sorted(n for n in names if "/" in n and not claimed(n))
        if foreign_guarded:
            folder = foreign_guarded[0].split("/", 1)[0]
            shown = [n + (" (a symbolic link)" if self.local and self.child(n).os_path.is_symlink() else "")
                     for n in foreign_guarded[:3]]
            raise UsageError(
                f"{self.loc}: {folder}/ holds files mmprep did not write there: " + ", ".join(shown)
                + (f" and {len(foreign_guarded) - 3} more" if len(foreign_guarded) > 3 else ""),
                hint=f"trainers read every file in {folder}/: move those files away, or choose another --out")
        unrecorded = sorted(n for n in names if n in self.shared_names and n not in shared and n not in owned)
        if unrecorded:
            raise UsageError(f"{self.loc}: {unrecorded[0]} exists and was not written by mmprep; it would be replaced",
                             hint="move it away, or choose another --out")
        mine = [n for n in names if n in owned or ("/" in n and self.scope_of(n.rsplit("/", 1)[-1]) == self.scope)]
        foreign = [n for n in names if n not in owned | others | shared and "/" not in n]
        if self.resume:
            if old is None:
                if mine:
                    raise UsageError(f"{self.loc}: has output files of {what} but no run record to resume from",
                                     hint="rerun with --overwrite to start again")
            elif old != identity:
                raise self._mismatch(old, identity, f" {what}")
        elif not self.overwrite:
            if mine or old is not None:
                raise UsageError(f"{self.loc}: already holds {what}",
                                 hint="pass --resume to continue an interrupted run or --overwrite to replace it")
            if foreign:
                raise UsageError(f"{self.loc}: output directory is not empty ({', '.join(sorted(foreign)[:3])})",
                                 hint="choose another --out, or --overwrite to write beside those files")
        else:
            self._delete_earlier(owned)
            if legacy or self._top_state(_RUN).size() is not None:
                self._delete_state(scope="")
        self._remove_temps()
        if self.local:  # created once the checks passed
            for folder in self.guarded:
                ensure_dir(self.loc.os_path / folder, root=self.loc.os_path)
        self._shared = set(shared)
        published = self._read_state_json(_FILES) if self.resume else None
        self._published = {n for n in published if isinstance(n, str)} if isinstance(published, list) else set()
        self._write_state(_RUN, identity)

    def _visible_names(self) -> list[str]:
        """The names in the folder, and in its guarded folders (as ``folder/name``), but the state folder and
        mmprep's temporary files."""
        out: list[str] = []
        for name in self.loc.list_names():
            if name == STATE_DIR or is_temp_name(name):
                continue
            if name in self.guarded:
                out += [f"{name}/{n}" for n in self.child(name).list_names() if not is_temp_name(n)]
            else:
                out.append(name)
        return out

    def _scopes(self) -> list[str]:
        return [n for n in self.loc.child(f"{STATE_DIR}/{_SCOPES}").list_names() if _safe_name(n) and "/" not in n]

    def _other_scopes_files(self) -> set[str]:
        """The files every other scope recorded (published, or written by a finished chunk)."""
        names: set[str] = set()
        for other in self._scopes():
            if other != self.scope:
                names |= self._earlier_files(scope=other)
        return names

    def _read_shared(self) -> set[str]:
        try:
            raw = json.loads(self._top_state(_SHARED).read_bytes()) if self._top_state(_SHARED).size() else []
        except (OSError, ValueError):
            raw = []
        return {n for n in raw if isinstance(n, str) and n in self.shared_names} if isinstance(raw, list) else set()

    def _mismatch(self, old: Any, identity: dict[str, Any], what: str) -> UsageError:
        """The refusal of a ``--resume`` whose identity differs, naming what differs as the user knows it."""
        keys = identity_diff(old, identity)
        shown = [self.describe(key, _at(old, key), _at(identity, key)) for key in keys]
        diff = list(dict.fromkeys(d for d in shown if d)) or [  # derived keys describe as ""
            f"{k} ({_at(old, k)!r} -> {_at(identity, k)!r})" for k in keys]
        return UsageError(
            f"{self.loc}: cannot resume{what}: the earlier run differs in " + "; ".join(diff[:4])
            + (f"; and {len(diff) - 4} more" if len(diff) > 4 else ""),
            hint="use the same inputs and flags, or --overwrite to start again",
        )

    def _prepare_local(self) -> None:
        root = self.loc.os_path
        try:
            st = os.stat(root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise UsageError(f"{root}: cannot use as output directory: {exc.strerror or exc}") from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{root}: exists and is not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{root}: cannot create output directory: {exc.strerror or exc}") from None
        if not os.access(root, os.W_OK):
            raise UsageError(f"{root}: output directory is not writable")
        ensure_dir(self._state(_CHUNKS).os_path, root=root)
        self._lock(root / STATE_DIR / "lock")

    def _lock(self, lock_path: Path) -> None:
        import fcntl

        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError:
            if lock_path.is_symlink():
                raise UsageError(f"{lock_path}: is a symbolic link; mmprep does not write through links",
                                 hint="remove the link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"{lock_path}: is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{self.loc}: another mmprep run (pid {other}) is writing to this directory",
                hint="wait for it to finish or choose another --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A failed or interrupted run (the engine has stopped its workers by now) leaves no temporary files.
        if exc_type is not None and (self._lock_fd is not None or not self.local):
            with contextlib.suppress(Exception):
                self._remove_temps()
        self.close()

    # -- what the earlier run wrote -----------------------------------------------------------------------------
    def _read_state_json(self, name: str, scope: str | None = None) -> Any:
        loc = self._state(name, scope)
        try:
            if loc.size() is None:
                return None
            return json.loads(loc.read_bytes())
        except (OSError, ValueError) as exc:
            if name == _RUN and (self.resume or not self.overwrite):
                raise UsageError(f"{loc}: the earlier run's record is damaged ({type(exc).__name__})",
                                 hint="rerun with --overwrite to start again") from None
            return None

    def _earlier_files(self, scope: str | None = None) -> set[str]:
        """Files an earlier run wrote, by exact name: the published ones and those of every finished chunk (of this
        run's scope, or of ``scope``; ``""``: the unscoped state)."""
        names: set[str] = set()
        published = self._read_state_json(_FILES, scope)
        if isinstance(published, list):
            names.update(n for n in published if isinstance(n, str))
        for rec_name in self._state(_CHUNKS, scope).list_names():
            if not re.fullmatch(r"\d{5,}\.json", rec_name):
                continue
            entry = self._read_state_json(f"{_CHUNKS}/{rec_name}", scope)
            if isinstance(entry, dict) and isinstance(entry.get("files"), list):
                names.update(n for n in entry["files"] if isinstance(n, str))
        return {n for n in names if _safe_name(n) and n not in self.shared_names}

    def _delete_earlier(self, owned: set[str]) -> None:
        """Delete the earlier run's files by exact name, and its state records (a fresh run starts clean)."""
        for name in sorted(owned):
            loc = self.child(name)
            if self.local and loc.os_path.is_symlink():
                raise UsageError(f"{loc}: is a symbolic link where the earlier run wrote a file; not deleted",
                                 hint="remove the link yourself, or choose another --out")
            try:
                loc.delete()
            except OSError as exc:
                raise RunFailed(f"{loc}: cannot delete the earlier run's file: {self.loc.scrub(str(exc))}") from None
        self._delete_state()

    def _delete_state(self, scope: str | None = None) -> None:
        """Delete the state records of this run's scope (of ``scope``), by name."""
        for rec_name in self._state(_CHUNKS, scope).list_names():
            if re.fullmatch(r"\d{5,}\.json", rec_name):
                self._state(f"{_CHUNKS}/{rec_name}", scope).delete()
        self._state(_FILES, scope).delete()
        if scope == "":
            self._state(_RUN, scope).delete()

    def _is_our_temp(self, name: str) -> bool:
        if not is_temp_name(name):
            return False
        final = name[1:].split(TEMP_MARK, 1)[0]
        return final in self.fixed_names or self.temp_owner(final)

    def _remove_temps(self) -> None:
        """Delete temporary files of mmprep's own (never a final name)."""
        folders = {""} | {posixpath_dir(n) for n in self.fixed_names} | set(self.guarded)
        for folder in sorted(folders):
            base = self.child(folder) if folder else self.loc
            for name in base.list_names():
                if self._is_our_temp(f"{folder}/{name}".lstrip("/")) or (folder and self._is_our_temp(name)):
                    base.child(name).delete()
        for state in (self._state(), self._state(_CHUNKS)):
            for name in state.list_names():
                if is_temp_name(name):
                    state.child(name).delete()

    # -- records --------------------------------------------------------------------------------------------------
    def finished(self, index: int) -> ChunkEntry | None:
        """The stored record of chunk ``index`` from an earlier run (only with ``resume``), or None."""
        if not self.resume:
            return None
        loc = self._state(f"{_CHUNKS}/{index:05d}.json")
        try:
            if loc.size() is None:
                return None
            raw = json.loads(loc.read_bytes())
            record, files = raw["record"], tuple(raw.get("files", ()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(record, dict):
            return None
        return ChunkEntry(record, files)

    def save(self, index: int, record: dict[str, Any], files: Sequence[str] = ()) -> None:
        """Store chunk ``index``'s record once its files are complete."""
        self._write_state(f"{_CHUNKS}/{index:05d}.json", {"record": record, "files": list(files)})

    def discard(self, index: int, files: Sequence[str]) -> None:
        """Delete the files chunk ``index`` wrote in this run and its record (by exact name, never through a link)."""
        for name in files:
            if not _safe_name(name):
                continue
            loc = self.child(name)
            if self.local and loc.os_path.is_symlink():
                continue
            try:
                loc.delete()
            except OSError as exc:
                raise RunFailed(f"{loc}: cannot delete an empty chunk file: {self.loc.scrub(str(exc))}") from None
            if self.local and "/" in name:  # a folder left empty (data/ of a run that wrote nothing) goes too
                with contextlib.suppress(OSError):
                    os.rmdir(loc.os_path.parent)
        self._state(f"{_CHUNKS}/{index:05d}.json").delete()

    def _write_state(self, name: str, obj: Any) -> None:
        self._state(name).write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    # -- files ------------------------------------------------------------------------------------------------------
    def intact(self, name: str, size: int, sha256: str) -> bool:
        """Whether ``name`` holds the expected bytes: size and sha256 locally, size alone on remote storage."""
        loc = self.child(name)
        try:
            if loc.size() != size:
                return False
            return not self.local or loc.sha256() == sha256
        except OSError:
            return False

    def visible(self, name: str, size: int) -> bool:
        """Whether a file a worker wrote is seen here with its size (the output must be storage all workers share)."""
        try:
            return self.child(name).size() == size
        except OSError:
            return False

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A local path to write ``name`` at (see :meth:`Location.staged`); its folder is created, without links."""
        if self.local:
            ensure_dir(self.child(name).os_path.parent, root=self.loc.os_path)
        with self.child(name).staged() as path:
            yield path

    def write(self, name: str, data: bytes) -> None:
        """Publish a final file atomically; it is recorded as ours first, for a later ``--overwrite`` (a shared name:
        as a file every scope may rewrite)."""
        if self.local:
            ensure_dir(self.child(name).os_path.parent, root=self.loc.os_path)
        if name in self.shared_names:
            if name not in self._shared:
                self._shared.add(name)
                self._top_state(_SHARED).write_bytes((json.dumps(sorted(self._shared)) + "\n").encode())
        elif name not in self._published:
            self._published.add(name)
            self._write_state(_FILES, sorted(self._published))
        self.child(name).write_bytes(data)

    def read(self, name: str) -> bytes | None:
        """The bytes of a file in the folder, None when there is none."""
        loc = self.child(name)
        if loc.size() is None:
            return None
        return loc.read_bytes()

    def delete_shared(self, name: str) -> None:
        """Delete a shared file mmprep wrote (a recorded shared name; anything else is left alone)."""
        if name in self.shared_names and name in self._shared:
            self.child(name).delete()


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def posixpath_dir(name: str) -> str:
    return name.rpartition("/")[0]


def _safe_name(name: str) -> bool:
    """A relative name inside the folder (no ``..``, not absolute, not the state folder)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and parts[0] != STATE_DIR and "" not in parts
