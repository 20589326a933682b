"""Reading and writing URIs: plain paths, ``file://`` and, by configuration, ``s3://``.

Everything goes through fsspec and pyarrow. Writes are atomic: a file is written to a
temporary name beside its target and renamed; a parquet dataset is written to a
temporary directory and renamed whole (on object stores, where renames are copies, the
dataset gets a ``_SUCCESS`` marker last and readers require it).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI without touching its scheme."""
    return posixpath.join(uri.rstrip("/"), *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the scheme-less path of ``uri``.

    ``s3://`` goes through pyarrow's native S3 client wrapped as an fsspec filesystem,
    configured the usual AWS way (``AWS_REGION``, ``AWS_ENDPOINT_URL_S3``, web identity
    or instance credentials); other schemes through fsspec's registry.
    """
    if uri.startswith(("s3://", "s3a://")):
        from fsspec.implementations.arrow import ArrowFSWrapper
        from pyarrow import fs as pafs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        s3 = pafs.S3FileSystem(endpoint_override=endpoint) if endpoint else pafs.S3FileSystem()
        return ArrowFSWrapper(s3), uri.split("://", 1)[1]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not _is_local(fs):
        # Object stores publish a PUT atomically; there is no partial object to see.
        with fs.open(path, "wb") as handle:
            handle.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_json(uri: str, payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    write_bytes(uri, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def local_path(uri: str) -> str:
    """The local filesystem path of a ``file://`` URI or plain path; fails for remote URIs."""
    fs, path = filesystem(uri)
    if not _is_local(fs):
        raise ValueError(f"{uri} is not on the local filesystem")
    return path


def replace_dir(tmp_uri: str, final_uri: str) -> None:
    """Publish a fully written directory ``tmp_uri`` as ``final_uri``.

    Locally this is a rename (the previous content, if any, is removed first: re-running a
    stage for the same inputs replaces its output). On object stores the directory is
    copied and a ``_SUCCESS`` marker is written last.
    """
    fs, tmp = filesystem(tmp_uri)
    _, final = filesystem(final_uri)
    if fs.exists(final):
        # Only replace what a stage wrote (it carries the marker) or an empty directory:
        # never a user's folder or a stage's own input.
        if not fs.isdir(final) or (fs.ls(final) and not fs.exists(posixpath.join(final, SUCCESS_MARKER))):
            fs.rm(tmp, recursive=True)
            raise FileExistsError(
                f"{final_uri} exists and is not an output of this pipeline (no {SUCCESS_MARKER}); "
                "choose another output or remove it"
            )
        fs.rm(final, recursive=True)
    if _is_local(fs):
        fs.makedirs(posixpath.dirname(final), exist_ok=True)
        fs.mv(tmp, final, recursive=True)
    else:
        fs.copy(tmp, final, recursive=True)
        fs.rm(tmp, recursive=True)
    with fs.open(posixpath.join(final, SUCCESS_MARKER), "wb"):
        pass


def temp_sibling(uri: str) -> str:
    """A fresh temporary URI beside ``uri``, for writing before :func:`replace_dir`."""
    return f"{uri.rstrip('/')}.tmp-{uuid.uuid4().hex}"


def write_table(table: pa.Table, uri: str, *, rows_per_part: int = 1_000_000) -> int:
    """Write ``table`` as a parquet dataset directory at ``uri`` atomically.

    Returns the number of rows written.
    """
    tmp = temp_sibling(uri)
    fs, tmp_path = filesystem(tmp)
    fs.makedirs(tmp_path, exist_ok=True)
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_part)):
        part = table.slice(start, rows_per_part)
        pq.write_table(part, posixpath.join(tmp_path, f"part-{index:05d}.parquet"), filesystem=fs)
    replace_dir(tmp, uri)
    return table.num_rows


def _hidden(relative: str) -> bool:
    """Whether a path inside a dataset is metadata (``_SUCCESS``, ``.crc``, ``_temporary/``)."""
    return any(piece.startswith((".", "_")) for piece in relative.split("/"))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file or dataset directory (Spark's or ours) into one table."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        root = path.rstrip("/")
        files = sorted(
            p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(p[len(root) + 1 :])
        )
        if not files:
            raise FileNotFoundError(f"{uri}: no parquet parts")
        tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
        return pa.concat_tables(tables, promote_options="default")
    return pq.read_table(path, columns=columns, filesystem=fs)
