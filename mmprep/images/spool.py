"""A spool of embedded image bytes: written once by the process that reads the input, read back by offset.

Rows of a Parquet or Arrow input may hold their images' bytes. Those bytes are appended to one local file while
the input is read, and a row keeps only where its bytes are (:class:`~mmprep.records.EmbeddedImage` ``offset`` and
``size``), so chunks of rows stay a few kilobytes on their way to the workers and the reader's memory does not grow
with the input. Workers on this machine read the bytes back with ``pread``. The spool is as large as the embedded
images (bounded by free disk space, not memory) and is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from mmprep.errors import RunFailed

__all__ = ["ImageSpool", "read_spooled"]


class ImageSpool:
    """An append-only file of image bytes in ``directory`` (default: ``$MMPREP_SPOOL_DIR``, else ``$TMPDIR``).

    Writes go straight to the file (no buffer), so a worker can read an image as soon as :meth:`put` returns.
    """

    def __init__(self, directory: str | None = None) -> None:
        folder = directory or os.environ.get("MMPREP_SPOOL_DIR") or None
        fd, self.path = tempfile.mkstemp(prefix="mmprep-images-", suffix=".spool", dir=folder)
        self._fd: int | None = fd
        self.size = 0

    def put(self, data: bytes) -> int:
        """Append ``data``; returns its offset.

        Raises:
            RunFailed: the spool cannot be written (disk full).
        """
        if self._fd is None:
            raise RunFailed(f"{self.path}: the image spool is closed")
        offset = self.size
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise RunFailed(f"cannot write the image spool {self.path}: {exc.strerror or exc}",
                            hint="embedded images are copied to a spool file while packing: free disk space "
                                 "there, or set MMPREP_SPOOL_DIR to a folder with room") from None
        self.size += len(data)
        return offset

    def remove(self) -> None:
        """Close and delete the spool (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_spooled(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a spool file.

    Raises:
        OSError: the spool cannot be read (or is shorter than expected).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: {len(data)} of {size} bytes at offset {offset}")
    return data
