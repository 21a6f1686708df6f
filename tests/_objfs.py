"""A stand-in remote object store for tests: ``objfs://[KEY:SECRET@]bucket/key`` over a local folder.

It is a real fsspec filesystem (``DirFileSystem`` over the local disk), reached only through a URI and storage
options, so it exercises the same code as ``s3://`` with an fsspec client: credentials parsed from the URI's user
part (as pyarrow's S3 does) or given as storage options, checked on every operation against ``root/.credentials``
(a worker that did not receive them fails), and the filesystem object pickled to worker processes.
"""

from __future__ import annotations

import json
import os
from urllib.parse import unquote, urlsplit

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ObjFS", "register"]


class ObjFS(DirFileSystem):
    protocol = "objfs"

    def __init__(self, root: str, key: str | None = None, secret: str | None = None, **kwargs) -> None:
        super().__init__(path=root, fs=LocalFileSystem(), **kwargs)
        self.root = root
        self.key = key
        self.secret = secret
        self._check()

    def _check(self) -> None:
        with open(os.path.join(self.root, ".credentials")) as f:
            want = json.load(f)
        if (self.key, self.secret) != (want["key"], want["secret"]):
            raise PermissionError("objfs: access denied (wrong or missing credentials)")

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("objfs://"):
            parts = urlsplit(path)
            path = parts.netloc.rsplit("@", 1)[-1] + parts.path
        return path.rstrip("/")

    @staticmethod
    def _get_kwargs_from_urls(path):
        parts = urlsplit(str(path))
        if "@" not in parts.netloc:
            return {}
        user = parts.netloc.rsplit("@", 1)[0]
        key, _, secret = user.partition(":")
        return {"key": unquote(key), "secret": unquote(secret)}

    def _join(self, path):
        self._check()
        return super()._join(path)


def register(root: str, key: str, secret: str) -> None:
    """Make ``objfs://`` known to fsspec in this process, with the credentials it accepts."""
    import fsspec

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".credentials"), "w") as f:
        json.dump({"key": key, "secret": secret}, f)
    fsspec.register_implementation("objfs", ObjFS, clobber=True)
