"""Content-addressed artifact store.

Layout under the root (``./.exitflow``, ``$EXITFLOW_HOME`` or ``--root``)::

    artifacts/<stage>/<key>/          complete artifacts: payload + manifest.json
    staging/<stage>/<key>/            work in progress (resumable); never read as complete
    pointers/<name>.json              named pointers (``current`` calibration, ``latest`` run)
    hashes.json                       memo of weight-file hashes keyed by path, size and mtime

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from stores.files import file_sha256, write_json_atomic
from stores.integrity import describe_files, summarize, verify_files

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
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


@dataclass
class Manifest:
    stage: str
    key: str
    config: dict
    inputs: dict[str, str]
    code_version: str
    created: str = ""
    metrics: dict = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class BrokenArtifact:
    """A key folder under ``artifacts/`` whose manifest is missing or unreadable."""

    stage: str
    key: str
    path: Path
    reason: str

    @property
    def created(self) -> str:
        """When the folder last changed (the manifest that would say is what is broken)."""
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.path.stat().st_mtime))
        except OSError:
            return "?"

    def message(self) -> str:
        k = self.key[:16]
        return (f"{self.stage} artifact {k} at {self.path} is broken: {self.reason}. `exitflow verify {k}` checks "
                f"it; to repair, delete it (`exitflow verify {k} --delete`) and re-run the {self.stage} stage")


@dataclass
class Verification:
    """What :meth:`ArtifactStore.verify` found: problems (each naming a file), and files it could
    only check by size because they were written before checksums were recorded."""

    stage: str
    key: str
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The problems on one line (the first few named, the rest counted)."""
        return summarize(self.problems)

    def line(self) -> str:
        """One line for a person: ok / broken, and what."""
        head = f"{self.stage:12s} {self.key[:16]}"
        if self.problems:
            return f"BROKEN  {head}  {self.summary()}"
        note = f"  (sizes only, written before checksums: {summarize(self.unverified)})" if self.unverified else ""
        return f"ok      {head}{note}"


class ArtifactStore:
    """All artifact bytes on disk go through here.

    With ``writable=False`` the store only reads (listing, showing, verifying an archive on a
    read-only disk) and refuses every write. Otherwise the root is created when missing, and
    whether it can be written is checked at the first write, with a message naming the fix.
    """

    def __init__(self, root: str | Path | None = None, writable: bool = True):
        self.root = Path(root) if root is not None else default_root()
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
        folder = self.path(stage, key)
        if not folder.is_dir():
            return None
        try:
            data = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is missing")
        except OSError as e:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} cannot be read ({e.strerror or e})")
        except ValueError as e:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is not JSON ({e})")
        problem = _manifest_problem(data)
        if problem is None and (data["stage"], data["key"]) != (stage, key):
            problem = f"it names {data['stage']}/{str(data['key'])[:16]}, not this folder"
        if problem:
            return BrokenArtifact(stage, key, folder, f"{MANIFEST} is not a valid manifest: {problem}")
        return Manifest.from_dict(data)

    # -- publishing --------------------------------------------------------------------------
    def publish(self, manifest: Manifest) -> Path:
        """Finish a staged artifact: hash its files, write the manifest, rename into place.

        A complete artifact already under the key (another run finished first: same key, same
        content) is kept; a broken one (no readable manifest) is replaced."""
        self._require_writable()
        dst = self.path(manifest.stage, manifest.key)
        src = self.root / "staging" / manifest.stage / manifest.key
        if not src.is_dir():
            raise StoreError(f"nothing staged for {manifest.stage}/{manifest.key} at {src}")
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for stray in src.rglob(".*.tmp"):  # an atomic write a kill interrupted: never payload
            stray.unlink(missing_ok=True)
        manifest.files = describe_files(src, skip=(MANIFEST,))
        write_json_atomic(src / MANIFEST, manifest.to_dict())
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
        self._remove(self.path(stage, key))

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, stage: str, key: str) -> Manifest:
        """The manifest of a complete artifact; ArtifactNotFound when there is none, and
        ArtifactBroken (naming `exitflow verify`) when its folder has no readable manifest."""
        found = self._load(stage, key)
        if found is None:
            raise ArtifactNotFound(f"no {stage} artifact with key {key} under {self.root}")
        if isinstance(found, BrokenArtifact):
            raise ArtifactBroken(found.message())
        return found

    def listing(self, stage: str | None = None) -> Iterator[Manifest | BrokenArtifact]:
        """Every artifact under the root (of `stage`), broken ones included, by stage and key."""
        base = self.root / "artifacts"
        if stage is not None:
            stages = [check_stage(stage)]
        else:
            stages = sorted(p.name for p in base.glob("*") if p.is_dir() and _STAGE.fullmatch(p.name))
        for s in stages:
            for d in sorted((base / s).glob("*")):
                if d.is_dir() and _KEY.fullmatch(d.name):
                    found = self._load(s, d.name)
                    if found is not None:
                        yield found

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
            raise ArtifactNotFound(f"no artifact key starts with {key_prefix!r} under {self.root}; `exitflow ls` lists them")
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
            raise ArtifactNotFound(f"no {stage} artifact with key {key} under {self.root}")
        if isinstance(found, BrokenArtifact):
            out.problems.append(found.reason)
            return out
        out.problems, out.unverified = verify_files(self.path(stage, key), found.files, checksums)
        return out

    def resolve_input(self, ref: str, name: str, stage: str) -> Manifest:
        """The upstream artifact a config names in ``inputs.<name>``: a key, a unique prefix,
        or ``current``/``latest``, meaning the artifact of that name in the run the pointer
        points to (the calibration's own inputs, and the heads' train cache)."""
        if ref not in POINTERS:
            return self.resolve(ref, stage)
        pointer = self.get_pointer(ref)
        if pointer is None:
            raise ArtifactNotFound(f"inputs.{name}={ref}: there is no `{ref}` run under {self.root} yet; run the "
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
        return sum(f.stat().st_size for f in self.path(stage, key).rglob("*") if f.is_file())

    # -- pointers ----------------------------------------------------------------------------
    def set_pointer(self, name: str, stage: str, key: str, **info: Any) -> None:
        self._require_writable()
        path = self.root / "pointers" / f"{check_pointer(name)}.json"
        write_json_atomic(path, {"stage": check_stage(stage), "key": check_key(key), **info})

    def get_pointer(self, name: str) -> dict | None:
        p = self.root / "pointers" / f"{check_pointer(name)}.json"
        if not p.is_file():
            return None
        try:
            pointer = json.loads(p.read_text())
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


def _manifest_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not an object"
    missing = [k for k in ("stage", "key", "config", "inputs", "code_version") if k not in data]
    if missing:
        return f"it lacks {', '.join(missing)}"
    wrong = [k for k, t in (("stage", str), ("key", str), ("config", dict), ("inputs", dict), ("files", dict),
                            ("metrics", dict), ("extra", dict)) if k in data and not isinstance(data[k], t)]
    return f"wrong type of {', '.join(wrong)}" if wrong else None
