"""Content-addressed artifact store.

Layout under the root (``./.exitflow``, ``$EXITFLOW_HOME`` or ``--root``)::

    artifacts/<stage>/<key>/          complete artifacts: payload + manifest.json
    staging/<stage>/<key>/            work in progress (resumable); never read as complete
    pointers/<name>.json              named pointers (``current`` calibration, ``latest`` run)
    hashes.json                       memo of weight-file hashes keyed by path, size and mtime

A key folder under ``artifacts/`` exists only once its stage finished: stages write into
``staging/`` and :meth:`ArtifactStore.publish` renames the folder into place, so nothing
incomplete ever looks complete, whatever kills the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from stores.files import file_sha256, write_json_atomic

MANIFEST = "manifest.json"
POINTERS = ("current", "latest")
"""Pointer names a config may give instead of an artifact key: the calibration in service, and
the last full pipeline run."""


class StoreError(RuntimeError):
    """A problem with the artifact root or an artifact in it."""


class ArtifactNotFound(StoreError):
    """No artifact matches the key or query."""


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


class ArtifactStore:
    """All artifact bytes on disk go through here."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self._check_writable()

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(
                f"artifact root {str(self.root)!r} is not writable ({e.strerror or e}); "
                "pass a writable folder with --root or set EXITFLOW_HOME"
            ) from None

    # -- locations ---------------------------------------------------------------------------
    def path(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    def staging(self, stage: str, key: str) -> Path:
        """The resumable work folder of an artifact; created if missing."""
        p = self.root / "staging" / stage / key
        p.mkdir(parents=True, exist_ok=True)
        return p

    def exists(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    # -- publishing --------------------------------------------------------------------------
    def publish(self, manifest: Manifest) -> Path:
        """Finish a staged artifact: hash its files, write the manifest, rename into place."""
        src = self.root / "staging" / manifest.stage / manifest.key
        if not src.is_dir():
            raise StoreError(f"nothing staged for {manifest.stage}/{manifest.key} at {src}")
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest.files = _describe_files(src)
        write_json_atomic(src / MANIFEST, manifest.to_dict())
        dst = self.path(manifest.stage, manifest.key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            # Same key means same content: another run finished first; keep theirs.
            shutil.rmtree(src, ignore_errors=True)
            return dst
        os.replace(src, dst)
        return dst

    def discard_staging(self, stage: str, key: str) -> None:
        shutil.rmtree(self.root / "staging" / stage / key, ignore_errors=True)

    def delete(self, stage: str, key: str) -> None:
        shutil.rmtree(self.path(stage, key), ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, stage: str, key: str) -> Manifest:
        p = self.path(stage, key) / MANIFEST
        if not p.is_file():
            raise ArtifactNotFound(f"no {stage} artifact with key {key} under {self.root}")
        return Manifest.from_dict(json.loads(p.read_text()))

    def iter_manifests(self, stage: str | None = None) -> Iterator[Manifest]:
        base = self.root / "artifacts"
        stages = [stage] if stage else sorted(p.name for p in base.glob("*") if p.is_dir())
        for s in stages:
            for d in sorted((base / s).glob("*")):
                m = d / MANIFEST
                if m.is_file():
                    yield Manifest.from_dict(json.loads(m.read_text()))

    def resolve(self, key_prefix: str, stage: str | None = None) -> Manifest:
        """Find an artifact by a unique key prefix (as `exitflow show` accepts)."""
        hits = [m for m in self.iter_manifests(stage) if m.key.startswith(key_prefix)]
        if not hits:
            raise ArtifactNotFound(f"no artifact key starts with {key_prefix!r} under {self.root}; `exitflow ls` lists them")
        if len(hits) > 1:
            raise StoreError(f"key prefix {key_prefix!r} is ambiguous ({len(hits)} artifacts); give more characters")
        return hits[0]

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
        write_json_atomic(self.root / "pointers" / f"{name}.json", {"stage": stage, "key": key, **info})

    def get_pointer(self, name: str) -> dict | None:
        p = self.root / "pointers" / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    # -- memos of derived facts ---------------------------------------------------------------
    def memo_get(self, name: str, key: str) -> dict | None:
        """A fact remembered under ``memo/<name>.json`` (e.g. the data fingerprint a plan would
        otherwise tokenize the corpus for); None when absent or unreadable."""
        try:
            return json.loads((self.root / "memo" / f"{name}.json").read_text()).get(key)
        except (OSError, ValueError):
            return None

    def memo_put(self, name: str, key: str, value: dict) -> None:
        path = self.root / "memo" / f"{name}.json"
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
                write_json_atomic(memo_path, memo)
            return memo[ident]

        return hasher


def _describe_files(folder: Path) -> dict[str, dict]:
    """Top-level entries of an artifact: files with size and sha256, folders (a zarr cache)
    with total size and file count. Chunk contents are covered by the content key."""
    out: dict[str, dict] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.is_file():
            out[entry.name] = {"size": entry.stat().st_size, "sha256": file_sha256(entry)}
        elif entry.is_dir():
            files = [f for f in entry.rglob("*") if f.is_file()]
            out[entry.name + "/"] = {"size": sum(f.stat().st_size for f in files), "files": len(files)}
    return out
