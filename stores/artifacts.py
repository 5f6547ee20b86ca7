"""Content-addressed artifact store.

Layout under the root (``./.exitflow``, ``$EXITFLOW_HOME`` or ``--root``)::

    artifacts/<stage>/<key>/          complete artifacts: payload + manifest.json
    staging/<stage>/<key>/            work in progress (resumable); never read as complete
    pointers/<name>.json              named pointers (``current`` calibration, ``latest`` run)
    hashes.json                       memo of weight-file hashes keyed by path, size and mtime

The root may also be a URL of any fsspec filesystem (``s3://bucket/exitflow``): artifacts and
pointers then live there, committed by writing each manifest last, and everything else in a
local mirror folder (:mod:`stores.remote`); ``file://`` URLs are local folders.

A key folder under ``artifacts/`` exists only once its stage finished: stages write into
``staging/`` and :meth:`ArtifactStore.publish` renames the folder into place, so nothing
incomplete ever looks complete, whatever kills the process.

What happens to the files afterwards (a disk error, a copy cut short, a hand that deleted one)
is caught by checksums: the manifest records every file's size and sha256, or names the sidecar
that records a cache's chunks (:mod:`stores.integrity`); :meth:`ArtifactStore.verify` checks
them all. A key folder without a readable manifest is *broken*: it is not complete
(:meth:`~ArtifactStore.exists` is False, so its stage runs again and :meth:`~ArtifactStore.publish`
replaces it), and listings show it as such instead of failing.

Keys, stage names and pointer names become paths, so each is checked where it enters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from stores.files import file_sha256, write_json_atomic
from stores.integrity import describe_files, verify_files
from stores.manifests import MANIFEST, BrokenArtifact, Manifest, Verification, manifest_problem
from stores.remote import RemoteError, RemoteRoot, adopt_staged, is_remote, local_path, mirror_folder

log = logging.getLogger(__name__)

POINTERS = ("current", "latest")
"""Pointer names a config may give instead of an artifact key: the calibration in service, and
the last full pipeline run."""


class StoreError(RuntimeError):
    """A problem with the artifact root or an artifact in it."""


class ArtifactNotFound(StoreError):
    """No artifact matches the key or query."""


class ArtifactBroken(StoreError):
    """An artifact's folder is there but its manifest is missing or unreadable."""


_KEY = re.compile(r"[0-9a-f]{1,128}")
"""An artifact key (content_key: 64 lowercase hex digits) or a prefix of one."""
_STAGE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_POINTER = re.compile(r"[a-z0-9_-]{1,64}")


def _check_name(kind: str, value: Any, pattern: re.Pattern, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise StoreError(f"{kind} {value!r} is not valid: {rule}; `exitflow ls` lists the artifacts")
    return value


def check_key(key: Any) -> str:
    return _check_name("artifact key", key, _KEY, "keys are lowercase hex digits")


def check_stage(stage: Any) -> str:
    return _check_name("stage name", stage, _STAGE, "stage names are lowercase letters, digits and _")


def check_pointer(name: Any) -> str:
    return _check_name("pointer name", name, _POINTER, "pointer names are lowercase letters, digits, _ and -")


def default_root() -> Path:
    return Path(os.environ.get("EXITFLOW_HOME", ".exitflow"))


def content_key(stage: str, code_version: str, config: dict, inputs: dict[str, str]) -> str:
    """sha256 over the stage, its code version, its canonical config and its input keys."""
    payload = {"stage": stage, "code_version": code_version, "config": config, "inputs": inputs}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ArtifactStore:
    """All artifact bytes on disk go through here.

    With ``writable=False`` the store only reads (listing, showing, verifying an archive on a
    read-only disk) and refuses every write. Otherwise the root is created when missing, and
    whether it can be written is checked at the first write, with a message naming the fix.
    """

    def __init__(self, root: str | Path | None = None, writable: bool = True):
        root = root if root is not None else os.environ.get("EXITFLOW_HOME", ".exitflow")
        self.remote = RemoteRoot(str(root)) if is_remote(root) else None
        self.root = mirror_folder(self.remote.url) if self.remote else local_path(root)
        """The local folder: the root itself, or a remote root's mirror (staging, locks, memos)."""
        self.location = self.remote.url if self.remote else str(self.root)
        """The root as a person gave it (a folder or a URL): what messages name."""
        self.writable = writable
        self._write_error: str | None = None
        self._probed = False
        self._warned: set[tuple[str, str]] = set()
        if writable:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._fail_writes(e)
                self._require_writable()

    def _fail_writes(self, e: OSError) -> None:
        self._probed = True
        self._write_error = (f"artifact root {str(self.root)!r} is not writable ({e.strerror or e}); "
                             "pass a writable folder with --root or set EXITFLOW_HOME")

    def _require_writable(self) -> None:
        """Raise StoreError unless this store may write; probes the root once."""
        if not self.writable:
            raise StoreError(f"artifact root {str(self.root)!r} was opened read-only; this command only reads")
        if not self._probed:
            self._probed = True
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-probe-{os.getpid()}-{id(self)}"  # two stores of one process may probe at once
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                self._fail_writes(e)
        if self._write_error:
            raise StoreError(self._write_error)

    # -- locations ---------------------------------------------------------------------------
    def path(self, stage: str, key: str) -> Path:
        """The artifact's local folder; on a remote root its mirror copy, downloaded (and
        checked against its manifest) on first use."""
        folder = self._folder(stage, key)
        if self.remote is not None:
            self.remote.fetch(stage, key, folder, self.root / "staging")
        return folder

    def _folder(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / check_stage(stage) / check_key(key)

    def staging(self, stage: str, key: str) -> Path:
        """The resumable work folder of an artifact; created if missing."""
        self._require_writable()
        p = self.root / "staging" / check_stage(stage) / check_key(key)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def exists(self, stage: str, key: str, strict: bool = False) -> bool:
        """True when the artifact is complete: its folder holds a readable manifest. A folder
        without one is not complete; with `strict` it raises ArtifactBroken (an input a stage
        is about to read) instead of answering False (an output it may rebuild)."""
        found = self._load(stage, key)
        if strict and isinstance(found, BrokenArtifact):
            raise ArtifactBroken(found.message())
        return isinstance(found, Manifest)

    def _load(self, stage: str, key: str) -> Manifest | BrokenArtifact | None:
        """The artifact's manifest; a BrokenArtifact when its folder has no readable one; None
        when there is no folder."""
        folder = self._folder(stage, key)
        where = f"{self.location}/{RemoteRoot.artifact(stage, key)}" if self.remote is not None else ""
        try:
            if self.remote is not None:  # objects without a manifest are a publish cut short: not there
                raw = self.remote.read(f"{RemoteRoot.artifact(stage, key)}/{MANIFEST}")
                if raw is None:
                    return None
            elif not folder.is_dir():
                return None
            else:
                raw = (folder / MANIFEST).read_bytes()
            data = json.loads(raw)
        except FileNotFoundError:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is missing")
        except OSError as e:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} cannot be read ({e.strerror or e})")
        except ValueError as e:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is not JSON ({e})", where)
        problem = manifest_problem(data)
        if problem is None and (data["stage"], data["key"]) != (stage, key):
            problem = f"it names {data['stage']}/{str(data['key'])[:16]}, not this folder"
        if problem:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is not a valid manifest: {problem}", where)
        return Manifest.from_dict(data)

    # -- publishing --------------------------------------------------------------------------
    def publish(self, manifest: Manifest) -> Path:
        """Finish a staged artifact: hash its files, write the manifest, rename into place (on a
        remote root: upload, manifest last, see :mod:`stores.remote`).

        A complete artifact already under the key (another run finished first: same key, same
        content) is kept; a broken one (no readable manifest) is replaced."""
        self._require_writable()
        dst = self._folder(manifest.stage, manifest.key)
        src = self.root / "staging" / manifest.stage / manifest.key
        if not src.is_dir():
            raise StoreError(f"nothing staged for {manifest.stage}/{manifest.key} at {src}")
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for stray in src.rglob(".*.tmp"):  # an atomic write a kill interrupted: never payload
            stray.unlink(missing_ok=True)
        manifest.files = describe_files(src, skip=(MANIFEST,))
        write_json_atomic(src / MANIFEST, manifest.to_dict())
        if self.remote is not None:
            return self._publish_remote(manifest, src, dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.exists(manifest.stage, manifest.key):
            shutil.rmtree(src, ignore_errors=True)
            return dst
        if dst.exists():
            log.warning("replacing broken %s artifact %s: %s", manifest.stage, manifest.key[:16],
                        self._load(manifest.stage, manifest.key).reason)  # type: ignore[union-attr]
            self._remove(dst)
        try:
            os.replace(src, dst)
        except OSError:
            if not self.exists(manifest.stage, manifest.key):  # not another run that finished meanwhile
                raise
            shutil.rmtree(src, ignore_errors=True)
        return dst

    def _publish_remote(self, manifest: Manifest, src: Path, dst: Path) -> Path:
        """No rename on an object store: upload the files, then the manifest (the commit); the
        staged folder becomes the mirror's copy. When another run committed the key first, its
        artifact is kept and fetched on first use."""
        if self.exists(manifest.stage, manifest.key):
            shutil.rmtree(src, ignore_errors=True)
            return dst
        committed = self.remote.upload(src, manifest.stage, manifest.key, manifest.to_dict())
        write_json_atomic(src / MANIFEST, committed)
        adopt_staged(src, dst)
        return dst

    def _remove(self, folder: Path) -> None:
        """Delete a folder so that no reader sees it half gone: renamed aside first (atomic)."""
        aside = self.root / "staging" / f".deleting-{folder.parent.name}-{folder.name}-{uuid.uuid4().hex[:12]}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(folder, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def discard_staging(self, stage: str, key: str) -> None:
        self._require_writable()
        shutil.rmtree(self.root / "staging" / check_stage(stage) / check_key(key), ignore_errors=True)

    def delete(self, stage: str, key: str) -> None:
        self._require_writable()
        if self.remote is not None:
            self.remote.delete(stage, key)
        self._remove(self._folder(stage, key))

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, stage: str, key: str) -> Manifest:
        """The manifest of a complete artifact; ArtifactNotFound when there is none, and
        ArtifactBroken (naming `exitflow verify`) when its folder has no readable manifest."""
        found = self._load(stage, key)
        if found is None:
            raise ArtifactNotFound(f"no {stage} artifact with key {key} under {self.location}")
        if isinstance(found, BrokenArtifact):
            raise ArtifactBroken(found.message())
        return found

    def listing(self, stage: str | None = None) -> Iterator[Manifest | BrokenArtifact]:
        """Every artifact under the root (of `stage`), broken ones included, by stage and key."""
        if stage is not None:
            stages = [check_stage(stage)]
        else:
            stages = [s for s in self._folders("artifacts") if _STAGE.fullmatch(s)]
        for s in stages:
            for key in self._folders(f"artifacts/{s}"):
                if _KEY.fullmatch(key):
                    found = self._load(s, key)
                    if found is not None:
                        yield found

    def _folders(self, rel: str) -> list[str]:
        """The names of the folders under `rel` (a remote root: of the objects' prefixes)."""
        if self.remote is not None:
            return self.remote.names(rel)
        return sorted(p.name for p in (self.root / rel).glob("*") if p.is_dir())

    def iter_manifests(self, stage: str | None = None) -> Iterator[Manifest]:
        """The complete artifacts (of `stage`); a broken one is skipped with a warning."""
        for found in self.listing(stage):
            if isinstance(found, Manifest):
                yield found
            elif (found.stage, found.key) not in self._warned:
                self._warned.add((found.stage, found.key))
                log.warning("skipping %s", found.message())

    def find(self, key_prefix: str, stage: str | None = None) -> Manifest | BrokenArtifact:
        """The one artifact, complete or broken, whose key starts with `key_prefix`."""
        if not key_prefix:
            raise StoreError("an empty key prefix would match every artifact; give the first characters of a key "
                             "(`exitflow ls` lists them)")
        check_key(key_prefix)
        hits = [a for a in self.listing(stage) if a.key.startswith(key_prefix)]
        if not hits:
            raise ArtifactNotFound(f"no artifact key starts with {key_prefix!r} under {self.location}; `exitflow ls` lists them")
        if len(hits) > 1:
            shown = "\n".join(f"  {a.stage:12s} {a.key[:16]}  {a.created}" for a in hits[:10])
            more = f"\n  ... and {len(hits) - 10} more" if len(hits) > 10 else ""
            raise StoreError(f"key prefix {key_prefix!r} is ambiguous ({len(hits)} artifacts); give more "
                             f"characters:\n{shown}{more}")
        return hits[0]

    def resolve(self, key_prefix: str, stage: str | None = None) -> Manifest:
        """Find a complete artifact by a unique key prefix (as `exitflow show` accepts)."""
        found = self.find(key_prefix, stage)
        if isinstance(found, BrokenArtifact):
            raise ArtifactBroken(found.message())
        return found

    # -- integrity ---------------------------------------------------------------------------
    def verify(self, stage: str, key: str, checksums: bool = True) -> Verification:
        """Check every file the manifest records (size and checksum), and every chunk its
        sidecars record: reads the whole artifact. Without `checksums`, only that every file is
        there with its size (a stat each, as `exitflow ls` does)."""
        out = Verification(stage, key)
        found = self._load(stage, key)
        if found is None:
            raise ArtifactNotFound(f"no {stage} artifact with key {key} under {self.location}")
        if isinstance(found, BrokenArtifact):
            out.problems.append(found.reason)
            return out
        if self.remote is not None:  # each object there with its size; checksums: on a downloaded copy
            out.problems = self.remote.check_objects(stage, key)
            if out.problems or not checksums:
                return out
            try:
                self.path(stage, key)
            except RemoteError as e:
                out.problems.append(str(e))
                return out
        out.problems, out.unverified = verify_files(self._folder(stage, key), found.files, checksums)
        return out

    def resolve_input(self, ref: str, name: str, stage: str) -> Manifest:
        """The upstream artifact a config names in ``inputs.<name>``: a key, a unique prefix,
        or ``current``/``latest``, meaning the artifact of that name in the run the pointer
        points to (the calibration's own inputs, and the heads' train cache)."""
        if ref not in POINTERS:
            return self.resolve(ref, stage)
        pointer = self.get_pointer(ref)
        if pointer is None:
            raise ArtifactNotFound(f"inputs.{name}={ref}: there is no `{ref}` run under {self.location} yet; run the "
                                   "pipeline once, or give an artifact key (`exitflow ls` lists them)")
        key = pointer.get(name)
        if key is None and pointer.get("stage") and self.exists(pointer["stage"], pointer["key"]):
            pointed = self.manifest(pointer["stage"], pointer["key"])
            key = pointed.inputs.get(name)
            if key is None and name == "train_cache" and "heads" in pointed.inputs:
                key = self.manifest("train_heads", pointed.inputs["heads"]).inputs.get("cache")
        if key is None:
            raise ArtifactNotFound(f"inputs.{name}={ref}: the `{ref}` run ({pointer.get('key', '?')[:12]}) has no "
                                   f"{name}; give an artifact key instead (`exitflow ls --stage {stage}`)")
        return self.manifest(stage, key)

    def size(self, stage: str, key: str) -> int:
        if self.remote is not None:
            return sum(self.remote.objects(RemoteRoot.artifact(stage, key)).values())
        return sum(f.stat().st_size for f in self.path(stage, key).rglob("*") if f.is_file())

    # -- pointers ----------------------------------------------------------------------------
    def set_pointer(self, name: str, stage: str, key: str, **info: Any) -> None:
        """Point `name` at an artifact: one file replaced atomically, or one object put whole."""
        self._require_writable()
        rel = f"pointers/{check_pointer(name)}.json"
        doc = {"stage": check_stage(stage), "key": check_key(key), **info}
        if self.remote is not None:
            self.remote.write(rel, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())
        else:
            write_json_atomic(self.root / rel, doc)

    def get_pointer(self, name: str) -> dict | None:
        rel = f"pointers/{check_pointer(name)}.json"
        p = f"{self.location}/{rel}" if self.remote is not None else self.root / rel
        try:
            raw = self.remote.read(rel) if self.remote is not None else (p.read_bytes() if p.is_file() else None)
            if raw is None:
                return None
            pointer = json.loads(raw)
        except (OSError, ValueError) as e:
            raise StoreError(f"pointer {p} is unreadable ({e}); delete it and run the pipeline again to set it") from None
        if not isinstance(pointer, dict):
            raise StoreError(f"pointer {p} holds no object; delete it and run the pipeline again to set it")
        return pointer

    # -- memos of derived facts ---------------------------------------------------------------
    def memo_get(self, name: str, key: str) -> dict | None:
        """A fact remembered under ``memo/<name>.json`` (e.g. the data fingerprint a plan would
        otherwise tokenize the corpus for); None when absent or unreadable."""
        try:
            return json.loads((self.root / "memo" / f"{check_pointer(name)}.json").read_text()).get(key)
        except (OSError, ValueError):
            return None

    def memo_put(self, name: str, key: str, value: dict) -> None:
        self._require_writable()
        path = self.root / "memo" / f"{check_pointer(name)}.json"
        try:
            memo = json.loads(path.read_text())
        except (OSError, ValueError):
            memo = {}
        memo[key] = value
        write_json_atomic(path, memo)

    # -- hashing of inputs -------------------------------------------------------------------
    def file_hasher(self):
        """A sha256 file hasher memoised on (path, size, mtime) in ``hashes.json``.

        Weight files of large models take minutes to hash; a key check should take seconds.
        """
        memo_path = self.root / "hashes.json"

        def hasher(path: Path) -> str:
            path = Path(path).resolve()
            st = path.stat()
            ident = f"{path}|{st.st_size}|{st.st_mtime_ns}"
            memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
            if ident not in memo:
                memo[ident] = file_sha256(path)
                if self.writable:  # a read-only store hashes again next time
                    self._require_writable()
                    write_json_atomic(memo_path, memo)
            return memo[ident]

        return hasher
