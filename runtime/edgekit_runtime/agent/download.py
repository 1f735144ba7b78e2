"""A resumable, crash-safe download of one artifact in chunks, kept on disk.

``DIR/SHA.part`` holds the bytes at their offsets and ``DIR/SHA.have`` one byte per chunk (1 = on
disk). A chunk's bytes are written and fsynced before its mark, and the marks are replaced
atomically (write, fsync, rename, fsync the folder), so after kill -9 or power loss the marks never
claim a chunk the file does not hold: the download resumes with what it has (downloads that die
and restart from zero are a top complaint about hawkBit). The whole file's sha256 is checked at the
end anyway; a mismatch starts over.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgekit_runtime.agent.protocol import Artifact
from edgekit_runtime.bundle import fsync_dir
from edgekit_runtime.errors import EdgekitError

__all__ = ["Download", "DownloadError"]


class DownloadError(EdgekitError):
    """The disk refused a chunk (full, read-only) or the finished file does not match its hash."""


class Download:
    def __init__(self, folder: Path, artifact: Artifact) -> None:
        self.folder = folder
        self.artifact = artifact
        self.part = folder / f"{artifact.sha256}.part"
        self.marks = folder / f"{artifact.sha256}.have"
        self.have = bytearray(artifact.chunks)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if self.part.exists() and self.marks.exists() and self.part.stat().st_size == artifact.size:
                old = self.marks.read_bytes()
                if len(old) == artifact.chunks:
                    self.have = bytearray(old)
            if not any(self.have):
                self._create()
        except OSError as e:
            msg = f"cannot prepare the download in {folder}: {e.strerror or e}"
            raise DownloadError(msg) from e

    def _create(self) -> None:
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.artifact.size)  # a full disk fails now, not at chunk 900
        except (AttributeError, OSError) as e:
            os.close(fd)
            if isinstance(e, OSError):
                self.part.unlink(missing_ok=True)
                msg = f"no room for a {self.artifact.size}-byte download in {self.folder}: {e.strerror or e}"
                raise DownloadError(msg) from e
            fd = os.open(self.part, os.O_WRONLY)
            os.ftruncate(fd, self.artifact.size)
        os.fsync(fd)
        os.close(fd)
        self._save_marks()

    @property
    def done(self) -> int:
        return sum(self.have)

    @property
    def complete(self) -> bool:
        return all(self.have)

    def missing(self, limit: int) -> list[int]:
        """Up to ``limit`` chunk indexes still needed, lowest first."""
        out: list[int] = []
        for i, h in enumerate(self.have):
            if not h:
                out.append(i)
                if len(out) == limit:
                    break
        return out

    def expected_size(self, index: int) -> int:
        a = self.artifact
        return min(a.chunk_size, a.size - index * a.chunk_size)

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; False for one already held (a duplicate). DownloadError on a bad
        index or size, or when the disk refuses."""
        if not 0 <= index < len(self.have) or len(data) != self.expected_size(index):
            msg = f"chunk {index} of {len(data)} bytes does not fit this {self.artifact.size}-byte artifact"
            raise DownloadError(msg)
        if self.have[index]:
            return False
        try:
            fd = os.open(self.part, os.O_WRONLY)
            try:
                os.pwrite(fd, data, index * self.artifact.chunk_size)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.have[index] = 1
            self._save_marks()
        except OSError as e:
            self.have[index] = 0
            msg = f"cannot write chunk {index} to {self.part}: {e.strerror or e}"
            raise DownloadError(msg) from e
        return True

    def _save_marks(self) -> None:
        tmp = self.marks.with_suffix(".have-tmp")
        with tmp.open("wb") as f:
            f.write(self.have)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.marks)
        fsync_dir(self.folder)

    def verify(self) -> Path:
        """The finished file, after its sha256 matched; on a mismatch the download starts over."""
        h = hashlib.sha256()
        with self.part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != self.artifact.sha256:
            self.discard()
            got, want = h.hexdigest()[:16], self.artifact.sha256[:16]
            msg = f"the downloaded file's sha256 is {got}..., not {want}...; downloading again"
            raise DownloadError(msg)
        return self.part

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.marks.unlink(missing_ok=True)
