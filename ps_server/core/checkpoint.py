"""Checkpoints on disk: written atomically, verified on load, never unpickled.

Layout: ``<data_dir>/<run_id>/ckpt-<seq>/`` holding ``arrays.npz`` (parameters, optimizer state,
held BSP gradients) and ``manifest.json`` (format, the run's metadata from ``Run.state_dict`` and
its SHA-256, the SHA-256 and size of ``arrays.npz``). The metadata's ``cut`` labels it: every update of clocks below
the cut is in (the min clock when it was taken is >= the cut); a cluster's checkpoint is one snapshot
of each server with the same cut. A checkpoint is written into a hidden temporary directory,
each file fsynced, then renamed into place and the parent directory fsynced: a crash at any point
leaves either the previous checkpoints or the new one, never a half one under a ``ckpt-`` name.
A deleted run's directory is renamed out of the runs first (``.deleted-``), so a crash while it is
removed never brings the run back, in part. Checkpoints a run went back past (``discard_after``)
are listed in ``discarding.json`` before the first is removed: until the list is removed none of them
is a checkpoint, and a restart finishes the discard (a crash midway never resumes one of them).
Loading checks the manifest, the hash and the shapes; a checkpoint that fails is skipped with an
error in the log and the next older one is tried. Arrays load with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["FORMAT", "Checkpoint", "CheckpointStore", "CorruptCheckpoint", "NewerCheckpoint"]

FORMAT = 1
_NAME = re.compile(r"ckpt-(\d{10,})")
"""A checkpoint's directory name (``ckpt-<seq>``, ten digits or more: ordered by number)."""
log = logging.getLogger("ps_server")


T = TypeVar("T")


def _itself(checkpoint: Checkpoint) -> Checkpoint:
    return checkpoint


class CorruptCheckpoint(Exception):
    pass


class NewerCheckpoint(CorruptCheckpoint):
    """A checkpoint of a format above ``FORMAT``: a newer ps-server's, not corrupt."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    skipped: tuple[str, ...] = ()
    """Newer checkpoints of its run that ``latest`` skipped for this one: each ``name: why``."""


def _meta_sha256(meta: Any) -> str:
    """The hash of a manifest's meta as JSON reads it back (keys sorted; written with checkpoints
    from 2026-12-05 on, checked when present)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_DELETED = ".deleted-"
"""The name a deleted run's directory takes before it is removed (``CheckpointStore.delete``)."""


_DISCARDING = "discarding.json"
"""In a run's directory: the names of its checkpoints being discarded (``discard_after``)."""


def _remove(path: Path) -> str:
    """Remove ``path`` and all in it: "", or what is left and why."""
    failed: list[str] = []
    shutil.rmtree(path, onerror=lambda _f, p, exc: failed.append(f"{p}: {getattr(exc[1], 'strerror', None) or exc[1]}"))
    if not failed:
        return ""
    more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
    return f"{path} is left ({failed[0]}{more})"


def _drop(checkpoint: Path) -> None:
    """Delete a checkpoint: renamed to a temporary name first, so that a crash while it is removed
    leaves no half checkpoint under its name (a manifest whose arrays are gone: its cut listed by
    ``cuts``, for a cluster to go back to, and not loadable)."""
    tmp = checkpoint.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        os.rename(checkpoint, tmp)
    except OSError:  # (gone already)
        return
    shutil.rmtree(tmp, ignore_errors=True)


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = max(1, keep)

    def _named(self, run_dir: Path) -> list[Path]:
        """Whatever in a run's directory is named as a checkpoint, newest (highest ``<seq>``) first."""
        if not run_dir.is_dir():
            return []
        named = ((int(m[1]), p) for p in run_dir.iterdir() if (m := _NAME.fullmatch(p.name)))
        return [p for _, p in sorted(named, reverse=True)]

    def _checkpoints(self, run_dir: Path) -> list[Path]:
        """Complete checkpoints of a run, newest first (temporaries, and anything else not named as
        this module names them, such as a copy someone made beside one, are ignored)."""
        discarding = self._discarding(run_dir)
        return [p for p in self._named(run_dir) if p.is_dir() and p.name not in discarding]

    def _discarding(self, run_dir: Path) -> set[str]:
        """The names of the run's checkpoints being discarded (none of them is a checkpoint)."""
        try:
            names = json.loads((run_dir / _DISCARDING).read_text())
        except FileNotFoundError:
            return set()
        except ValueError as exc:  # (written whole, then renamed into place: only a hand could break it)
            log.error("ignoring %s: %s", run_dir / _DISCARDING, exc)
            return set()
        return {n for n in names if isinstance(n, str) and _NAME.fullmatch(n)} if isinstance(names, list) else set()

    def write(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], protect: Collection[int] = (),
              keep_oldest: bool = False) -> Path:
        """Write one checkpoint of ``meta["run_id"]`` atomically; prune to the newest ``keep``, but
        for the newest checkpoint of each cut in ``protect`` (cuts a cluster can go back to) and,
        if ``keep_oldest``, of cut 0 and its oldest other cut (a cluster's shard before server 0 has
        said which cuts all servers have: cut 0, which every server writes at creation, and its first
        periodic one, which every server writes at once: going back to cut 0, before any worker
        joined, sends every worker away)."""
        run_dir = self.root / str(meta["run_id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        existing = self._checkpoints(run_dir)
        # (after anything named as one: a file someone left as ckpt-<seq> would take its name)
        named = self._named(run_dir)
        # (and after those being discarded: a crash before the list is removed would discard this one)
        seqs = [int(n.split("-")[1]) for n in {*(p.name for p in named[:1]), *self._discarding(run_dir)}]
        seq = max(seqs, default=0) + 1
        final = run_dir / f"ckpt-{seq:010d}"
        tmp = run_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            npz = tmp / "arrays.npz"
            with open(npz, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            manifest = {"format": FORMAT, "arrays_sha256": _sha256(npz), "arrays_bytes": npz.stat().st_size,
                        "meta_sha256": _meta_sha256(json.loads(json.dumps(meta))), "meta": meta}
            with open(tmp / "manifest.json", "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync(tmp)
            os.rename(tmp, final)
            if not existing:  # its run's first: the run's directory too, or a power cut may lose both
                _fsync(self.root)
            _fsync(run_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        listed = self._checkpoints(run_dir)
        kept = listed[: self.keep]
        if keep_oldest:
            cuts = {c for c in map(self._cut, listed) if c is not None}
            first = min(cuts - {0}, default=None)
            protect = {*protect, *(cuts & {0}), *(() if first is None else (first,))}
        for old in listed[self.keep :]:
            cut = self._cut(old)
            if cut in protect and cut not in map(self._cut, kept):
                kept.append(old)
                continue
            _drop(old)
        return final

    def delete(self, run_id: str) -> str:
        """Delete every checkpoint of ``run_id`` (its directory), if any: moved out of the runs at
        once (renamed ``.deleted-...``: from then on no restart resumes the run), then removed.
        OSError if it cannot be moved: then nothing changed. What could not be removed (a file
        held on NFS, a directory this user may not write), where and why, or "" (``latest``
        removes it at the next start)."""
        gone = self.root / f"{_DELETED}{run_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.root / run_id, gone)
        except FileNotFoundError:
            return ""
        _fsync(self.root)
        return _remove(gone)

    def _cut(self, path: Path) -> int | None:
        try:
            meta = json.loads((path / "manifest.json").read_text())["meta"]
            return int(meta.get("cut", meta["min_clock"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def cuts(self, run_id: str) -> list[int]:
        """The cuts of ``run_id``'s checkpoints, newest first (from their manifests; one whose
        manifest does not read is left out)."""
        return [c for c in map(self._cut, self._checkpoints(self.root / run_id)) if c is not None]

    def discard_after(self, run_id: str, cut: int) -> None:
        """Delete ``run_id``'s checkpoints of cuts above ``cut``: the run went back to ``cut``, and
        they belong to a history that is no longer its own. Their list lands first, in one rename
        (a crash once they were partly removed would resume the newest left, of that history);
        ``latest`` finishes a discard a crash cut short."""
        run_dir = self.root / run_id
        doomed = {p.name for p in self._checkpoints(run_dir) if (self._cut(p) or 0) > cut}
        if not doomed:
            return
        tmp = run_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "w") as f:
                json.dump(sorted(doomed | self._discarding(run_dir)), f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, run_dir / _DISCARDING)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(run_dir)
        self._discard(run_dir)

    def _discard(self, run_dir: Path) -> None:
        """Remove the checkpoints listed as being discarded, then the list."""
        for name in self._discarding(run_dir):
            _drop(run_dir / name)
        _fsync(run_dir)  # (they are gone for good before the list is)
        os.unlink(run_dir / _DISCARDING)

    def load_cut(self, run_id: str, cut: int) -> Checkpoint:
        """The newest checkpoint of ``run_id`` labelled ``cut`` that loads; CorruptCheckpoint if none."""
        why = "there is none"
        for path in self._checkpoints(self.root / run_id):
            if self._cut(path) == cut:
                try:
                    return self.load(path)
                except CorruptCheckpoint as exc:
                    why = f"{path.name}: {exc}"
        raise CorruptCheckpoint(f"no checkpoint of {run_id} at cut {cut} loads ({why})")

    def load(self, path: Path) -> Checkpoint:
        """Load and verify one checkpoint directory; raises CorruptCheckpoint saying why."""
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"unreadable manifest: {exc}") from None
        newer = manifest.get("format") if isinstance(manifest, dict) else None
        if type(newer) is int and newer > FORMAT:
            raise NewerCheckpoint(f"format {newer}, written by a newer ps-server (this one reads format {FORMAT})")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "meta" not in manifest:
            raise CorruptCheckpoint(f"manifest is not a format-{FORMAT} checkpoint")
        if "meta_sha256" in manifest and _meta_sha256(manifest["meta"]) != manifest["meta_sha256"]:
            # (the clocks in it are the de-duplication table: a changed one would drop or repeat pushes)
            raise CorruptCheckpoint("the manifest's meta does not match its hash")
        npz = path / "arrays.npz"
        try:
            size, digest = npz.stat().st_size, _sha256(npz)
        except OSError as exc:
            raise CorruptCheckpoint(f"unreadable arrays: {exc}") from None
        if size != manifest.get("arrays_bytes") or digest != manifest.get("arrays_sha256"):
            raise CorruptCheckpoint("arrays.npz does not match the hash in the manifest")
        try:
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # (BadZipFile: a bad archive or CRC)
            raise CorruptCheckpoint(f"arrays.npz does not load: {exc}") from None
        return Checkpoint(path, manifest["meta"], arrays)

    def latest(self, use: Callable[[Checkpoint], T] = _itself) -> list[T]:  # type: ignore[assignment]
        """``use`` of the newest valid checkpoint of every run under root. Corrupt ones, and those
        ``use`` refuses (raising CorruptCheckpoint, KeyError, ValueError, TypeError, AttributeError
        or IndexError: they do not fit their run), are skipped loudly for the next older one. A run
        whose newest is of a newer format (``NewerCheckpoint``) is left out, loudly; a checkpoint of
        a run of another name than its directory's (a copy) is skipped as a corrupt one."""
        found: list[T] = []
        if not self.root.is_dir():
            return found
        for run_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if run_dir.name.startswith(_DELETED):  # a run deleted before a crash, or not all removed then
                if left := _remove(run_dir):
                    log.warning("a deleted run's files could not be removed: %s; remove them by hand", left)
                continue
            try:
                for tmp in run_dir.glob(".tmp-*"):  # a write that crashed: never a checkpoint
                    if tmp.is_file():  # (the list of a discard)
                        tmp.unlink(missing_ok=True)
                    else:
                        shutil.rmtree(tmp, ignore_errors=True)
                paths = self._checkpoints(run_dir)
            except OSError as exc:  # (a file system's lost+found, another user's directory)
                log.warning("skipping %s in the data directory: cannot read it (%s)", run_dir, exc.strerror or exc)
                continue
            if (run_dir / _DISCARDING).exists():  # a discard a crash cut short (its list holds meanwhile)
                try:
                    self._discard(run_dir)
                except OSError as exc:
                    log.warning("could not finish discarding checkpoints of %s: %s", run_dir.name, exc)
            skipped: list[str] = []
            for path in paths:
                try:
                    checkpoint = self.load(path)
                    if isinstance(checkpoint.meta, dict) and checkpoint.meta.get("run_id") != run_dir.name:
                        # (the run's own directory is resumed; a copy's older state would replace it)
                        raise CorruptCheckpoint(f"it is of {checkpoint.meta.get('run_id')}, not of "
                                                f"{run_dir.name} (a copy?)")
                    found.append(use(dataclasses.replace(checkpoint, skipped=tuple(skipped))))
                    break
                except NewerCheckpoint as exc:  # (an older one would lose its progress, and pruning it)
                    log.error("not resuming %s: its checkpoint %s is of %s; its checkpoints are left as they are: "
                              "run a ps-server that reads them", run_dir.name, path.name, exc)
                    break
                except CorruptCheckpoint as exc:
                    log.error("skipping corrupt checkpoint %s: %s", path, exc)
                    skipped.append(f"{path.name}: corrupt: {exc}")
                except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
                    log.error("skipping checkpoint %s: it does not fit its run: %s", path, exc)
                    skipped.append(f"{path.name}: it does not fit its run: {exc}")
            else:
                if paths:
                    log.error("no valid checkpoint for %s: the run cannot be resumed", run_dir.name)
        return found
