"""Bundle files on the hub's disk, content-addressed: ``ARTIFACTS/<sha256>.ekb``.

An upload is written to ``ARTIFACTS/.incoming/`` first; only a fully checked file is renamed into
place (fsynced before, folder fsynced after), so a crash or a refusal never leaves a partial
artifact under its address. What a crash can leave (an upload in ``.incoming``, or a file whose
row never committed) is removed by ``sweep`` when the hub starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from edgekit_runtime.bundle import default_file_mode, fsync_dir
from edgekit_runtime.errors import InvalidInputError

__all__ = ["Artifacts"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".ekb"


class Artifacts:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming_dir = root / ".incoming"
        try:
            self.incoming_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            msg = f"cannot create {self.incoming_dir}: {e.strerror}; give --data a folder you can write to"
            raise InvalidInputError(msg) from None

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            msg = f"{sha256!r} is not a sha256 (64 lower-case hex digits)"
            raise InvalidInputError(msg)
        return self.root / f"{sha256}{_SUFFIX}"

    def new_upload(self) -> tuple[int, Path]:
        """An open file descriptor and path for an upload in progress (the caller closes the fd)."""
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.incoming_dir)
        return fd, Path(name)

    def adopt(self, upload: Path, sha256: str) -> bool:
        """Put a checked upload at its address; True when the file is new (False: it was there)."""
        target = self.path(sha256)
        if target.exists():
            upload.unlink(missing_ok=True)
            return False
        fd = os.open(upload, os.O_RDONLY)
        try:
            os.fchmod(fd, default_file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        upload.replace(target)
        fsync_dir(self.root)
        return True

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
        fsync_dir(self.root)

    def stored(self) -> set[str]:
        names = (p.name[: -len(_SUFFIX)] for p in self.root.glob(f"*{_SUFFIX}"))
        return {n for n in names if _SHA256.match(n)}

    def sweep(self, referenced: set[str]) -> list[str]:
        """Remove unfinished uploads and artifacts no bundle row names (left by a crash); their names."""
        removed = [p.name for p in self.incoming_dir.iterdir()]
        for p in self.incoming_dir.iterdir():
            p.unlink(missing_ok=True)
        for sha in sorted(self.stored() - referenced):
            self.path(sha).unlink(missing_ok=True)
            removed.append(f"{sha}{_SUFFIX}")
        if removed:
            fsync_dir(self.root)
        return removed
