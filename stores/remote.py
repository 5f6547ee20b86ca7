"""An artifact root on any fsspec filesystem (``s3://``, ``gs://``, ``memory://`` in tests).

A root given as a plain path or a ``file://`` URL is a local folder, published by atomic
rename (:mod:`stores.artifacts`). Any other protocol is a *remote root*: object stores have
no rename, so an artifact there is committed by its manifest instead:

1. the staged files are uploaded under ``<url>/artifacts/<stage>/<key>/``;
2. ``manifest.json`` is uploaded last. It lists every uploaded object with its size
   (``objects``) beside the usual file records, and **an artifact exists iff its manifest
   object exists**: a publish cut short leaves objects without a manifest, which no reader
   sees, and the next publish of that key deletes the strays before uploading again.

Everything that needs a real local disk stays in a *mirror* folder, one per URL
(``$EXITFLOW_MIRROR/<hash of url>``, by default under ``~/.cache/exitflow/mirror``), laid out
like a local root: staging folders (resumable builds), build locks, memos, weight-file
hashes, Prefect's task results, the reports index, and a local copy of each artifact used
here. Stages keep reading local files: :meth:`RemoteRoot.fetch` downloads an artifact into
the mirror on first use (manifest first, then each object checked against the manifest's
size, then every checksum the manifest and a cache's chunk sidecar record), and renames the
whole folder into place, so a mirror folder with a manifest is a complete copy.

Build locks are per mirror, so per machine: two machines that publish the same key at once
both upload the same bytes (the key is a content hash), and either manifest commits it.

Readers that do not want a mirror can open a published zarr cache straight from the URL
with :func:`open_zarr` (zarr v3 over fsspec); they read without the chunk checksums that
:class:`stores.cache.CacheReader` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import zarr
from fsspec.core import url_to_fs

from stores.integrity import summarize, verify_files
from stores.manifests import MANIFEST

MIRROR_ENV = "EXITFLOW_MIRROR"
"""Folder holding the local mirrors of remote roots (one subfolder per URL)."""
LOCAL_PROTOCOLS = ("file", "local")


class RemoteError(RuntimeError):
    """A remote root cannot be reached, or an artifact on it does not match its manifest."""


def is_remote(root: str | Path | None) -> bool:
    """True for a URL whose filesystem is not the local one (``memory://``, ``s3://``...)."""
    if root is None or isinstance(root, Path) or "://" not in str(root):
        return False
    protocol = str(root).split("://", 1)[0]
    return protocol not in LOCAL_PROTOCOLS


def local_path(root: str | Path) -> Path:
    """A plain path or a ``file://`` URL as a local path."""
    text = str(root)
    if isinstance(root, str) and "://" in text:
        return Path(url_to_fs(text)[1])
    return Path(root)


def mirror_folder(url: str) -> Path:
    """The local mirror of a remote root: ``$EXITFLOW_MIRROR`` (else the user's cache folder)
    joined with a hash of the URL, so two roots never share staging folders or locks."""
    base = os.environ.get(MIRROR_ENV)
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exitflow" / "mirror"
    return Path(base).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]


class RemoteRoot:
    """The objects of one remote root: manifests, payload files and pointers under ``url``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.base = url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise RemoteError(f"artifact root {url!r}: {e}; install the fsspec filesystem for its protocol "
                              "(s3fs for s3://, gcsfs for gs://) or give a local folder") from None
        self.base = self.base.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    @staticmethod
    def artifact(stage: str, key: str) -> str:
        return f"artifacts/{stage}/{key}"

    # -- whole objects -----------------------------------------------------------------------
    def read(self, rel: str) -> bytes | None:
        """The bytes of object `rel`; None when there is none. A root that cannot be read at all
        (credentials, network) is an error, not a missing or broken artifact."""
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RemoteError(f"cannot read {self.url}/{rel} ({e}); check the credentials in the environment "
                              "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and that the bucket exists") from e

    def write(self, rel: str, data: bytes) -> None:
        """Put one whole object: a reader sees the old one or the new one (a single PUT)."""
        self.fs.pipe_file(self._path(rel), data)

    def names(self, rel: str) -> list[str]:
        """The names directly under folder `rel` (none when it is absent)."""
        try:
            entries = self.fs.ls(self._path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def objects(self, rel: str) -> dict[str, int]:
        """Every object under folder `rel` with its size, by path relative to it."""
        prefix = self._path(rel).strip("/") + "/"
        try:
            found = self.fs.find(self._path(rel), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            name = str(name).strip("/")  # some filesystems name objects with a leading "/", some without
            if name.startswith(prefix) and info.get("type", "file") != "directory":
                out[name[len(prefix):]] = int(info.get("size") or 0)
        return out

    # -- publishing --------------------------------------------------------------------------
    def upload(self, folder: Path, stage: str, key: str, manifest: dict) -> dict:
        """Upload the staged `folder`, then its manifest (the commit). Returns the manifest as
        committed, with ``objects``. Objects a cut-short publish left are deleted first."""
        rel = self.artifact(stage, key)
        files = {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*"))
                 if f.is_file() and f.name != MANIFEST}
        strays = set(self.objects(rel)) - set(files)
        if strays:
            self.fs.rm([self._path(f"{rel}/{s}") for s in sorted(strays)])
        for name in files:
            self._put(folder / name, f"{rel}/{name}")
        doc = {**manifest, "objects": files}
        self.write(f"{rel}/{MANIFEST}", json.dumps(doc, indent=2, sort_keys=True, default=str).encode())
        return doc

    def _put(self, local: Path, rel: str) -> None:
        self.fs.put_file(str(local), self._path(rel))

    def delete(self, stage: str, key: str) -> None:
        """Remove an artifact: its manifest first, so no reader sees it half gone."""
        rel = self.artifact(stage, key)
        try:
            self.fs.rm_file(self._path(f"{rel}/{MANIFEST}"))
        except FileNotFoundError:
            pass
        remaining = self.objects(rel)
        if remaining:
            self.fs.rm([self._path(f"{rel}/{name}") for name in sorted(remaining)])

    # -- reading -----------------------------------------------------------------------------
    def check_objects(self, stage: str, key: str, manifest: dict | None = None) -> list[str]:
        """Each object the manifest lists, present with its size (one listing, no payload read)."""
        if manifest is None:
            raw = self.read(f"{self.artifact(stage, key)}/{MANIFEST}")
            if raw is None:
                return [f"{MANIFEST}: missing"]
            try:
                manifest = json.loads(raw)
            except ValueError as e:
                return [f"{MANIFEST}: not JSON ({e})"]
        listed = manifest.get("objects")
        if not isinstance(listed, dict):
            return [f"{MANIFEST}: lists no objects (not written by a remote publish)"]
        there = self.objects(self.artifact(stage, key))
        problems = []
        for name, size in sorted(listed.items()):
            got = there.get(name)
            if got is None:
                problems.append(f"{name}: missing (recorded {size} bytes)")
            elif got != size:
                problems.append(f"{name}: {got} bytes, recorded {size}")
        return problems

    def fetch(self, stage: str, key: str, dest: Path, scratch: Path) -> bool:
        """Download artifact `stage/key` into `dest` unless a complete copy is there; False when
        the root has no such artifact. The copy is assembled in a folder under `scratch`,
        checked against the manifest (sizes, then checksums), and renamed into place whole."""
        if (dest / MANIFEST).is_file():
            return True
        raw = self.read(f"{self.artifact(stage, key)}/{MANIFEST}")
        if raw is None:
            return False
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise RemoteError(f"{stage} artifact {key[:16]} at {self.url}: {MANIFEST} is not JSON ({e}); delete it "
                              f"(`exitflow verify {key[:16]} --delete --root {self.url}`) and re-run the {stage} stage") from None
        problems = self.check_objects(stage, key, manifest)
        if problems:
            raise RemoteError(f"{stage} artifact {key[:16]} at {self.url} does not match its manifest: "
                              f"{summarize(problems)}; delete it (`exitflow verify {key[:16]} --delete "
                              f"--root {self.url}`) and re-run the {stage} stage")
        tmp = scratch / f".fetch-{stage}-{key[:16]}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            self._download(stage, key, manifest["objects"], tmp)
            problems, _ = verify_files(tmp, manifest.get("files", {}), checksum=True)
            if problems:
                raise RemoteError(f"{stage} artifact {key[:16]} downloaded from {self.url} is damaged: "
                                  f"{summarize(problems)}; delete it (`exitflow verify {key[:16]} --delete "
                                  f"--root {self.url}`) and re-run the {stage} stage")
            (tmp / MANIFEST).write_bytes(raw)
            _move_into_place(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def _download(self, stage: str, key: str, objects: dict[str, Any], into: Path) -> None:
        rel = self.artifact(stage, key)
        for name, size in sorted(objects.items()):
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(f"{rel}/{name}"), str(target))
            if target.stat().st_size != size:
                raise RemoteError(f"{stage} artifact {key[:16]} at {self.url}: {name} arrived with "
                                  f"{target.stat().st_size} bytes, its manifest records {size}; run again, and "
                                  "if it persists delete the artifact and re-run its stage")


def _move_into_place(src: Path, dest: Path) -> None:
    """Rename a complete local folder to `dest`; a copy another thread put there first wins,
    a folder there without a manifest (an old partial copy) is replaced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not (dest / MANIFEST).is_file():
        aside = src.parent / f".aside-{uuid.uuid4().hex[:12]}"
        os.replace(dest, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(src, dest)
    except OSError:
        if not (dest / MANIFEST).is_file():
            raise


def adopt_staged(src: Path, dest: Path) -> None:
    """Make a just-published staging folder the mirror's copy (no download needed)."""
    if (dest / MANIFEST).is_file():
        shutil.rmtree(src, ignore_errors=True)
        return
    _move_into_place(src, dest)
    shutil.rmtree(src, ignore_errors=True)


def open_zarr(url: str, storage_options: dict | None = None) -> zarr.Group:
    """A published zarr group (a cache: ``<root>/artifacts/extract/<key>/cache.zarr``) opened
    read-only straight from its URL, zarr v3 over fsspec: no mirror, no download of what is
    not read. Checks that the artifact holding it is committed (its manifest exists)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    artifact = path.rstrip("/").rsplit("/", 1)[0]
    if not fs.exists(f"{artifact}/{MANIFEST}"):
        raise RemoteError(f"{url} is not inside a published artifact (no {artifact}/{MANIFEST}); "
                          "`exitflow ls --root ROOT` lists them")
    return zarr.open_group(store=url, mode="r", **({"storage_options": storage_options} if storage_options else {}))


