"""What an artifact's manifest holds, and what the store reports about an artifact: a broken
one (its manifest missing or unreadable), and the result of verifying one's files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stores.integrity import summarize

MANIFEST = "manifest.json"
"""The file (on a remote root: the object, written last) whose presence makes an artifact complete."""


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
    where: str = ""
    """Where the artifact is, when that is not `path` (a URL on a remote root; `path` is then
    its folder in the local mirror)."""

    @property
    def created(self) -> str:
        """When the folder last changed (the manifest that would say is what is broken)."""
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.path.stat().st_mtime))
        except OSError:
            return "?"

    def message(self) -> str:
        k = self.key[:16]
        return (f"{self.stage} artifact {k} at {self.where or self.path} is broken: {self.reason}. `exitflow verify {k}` checks "
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


def manifest_problem(data: Any) -> str | None:
    """What makes `data` no manifest (None: nothing): a missing field or one of the wrong type."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not an object"
    missing = [k for k in ("stage", "key", "config", "inputs", "code_version") if k not in data]
    if missing:
        return f"it lacks {', '.join(missing)}"
    wrong = [k for k, t in (("stage", str), ("key", str), ("config", dict), ("inputs", dict), ("files", dict),
                            ("metrics", dict), ("extra", dict)) if k in data and not isinstance(data[k], t)]
    return f"wrong type of {', '.join(wrong)}" if wrong else None
