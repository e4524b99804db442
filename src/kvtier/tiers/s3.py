"""S3 (or any S3-compatible store) as the coldest shared tier.

``s3://bucket/prefix?endpoint_url=http://host:9000&region=us-east-1`` (credentials
from the usual AWS environment or ``access_key`` / ``secret_key`` options). Each block
is one object, ``<prefix>/<2 hex>/<key hex>``, holding a record (header + payload), so
reads are verified. Blocks larger than ``multipart_bytes`` (default 8 MiB) are uploaded
in parts. A missing object is a miss; a store that cannot be reached raises
:class:`~kvtier.errors.StorageError`, which the health guard turns into misses.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import numpy as np

from kvtier.core.index import BlockMeta
from kvtier.core.keys import BlockKey
from kvtier.errors import ConfigError, StorageError
from kvtier.layout import get_codec
from kvtier.tiers import _record
from kvtier.tiers.remote import RemoteURL

__all__ = ["S3Tier"]

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3Tier:
    """Blocks as objects under ``s3://bucket/prefix``."""

    name = "s3"

    def __init__(self, url: str, *, compression: str = "none") -> None:
        parsed = RemoteURL.parse(url)
        if not parsed.hosts:
            raise ConfigError(f"{url}: name the bucket, s3://bucket/prefix")
        self.url = url
        self.bucket = parsed.hosts[0][0]
        self.prefix = parsed.path.strip("/")
        self.multipart_bytes = parsed.size("multipart_bytes") or 8 << 20
        self._codec = get_codec(compression)
        options = parsed.options
        self._s3 = boto3.client(
            "s3",
            endpoint_url=options.get("endpoint_url"),
            region_name=options.get("region", "us-east-1"),
            aws_access_key_id=options.get("access_key"),
            aws_secret_access_key=options.get("secret_key"),
            config=botocore.config.Config(
                connect_timeout=2,
                read_timeout=30,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=self.multipart_bytes,
            multipart_chunksize=self.multipart_bytes,
        )
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kvtier-s3")

    def _object(self, key: BlockKey) -> str:
        name = key.hex()
        return (
            f"{self.prefix}/{name[:2]}/{name}" if self.prefix else f"{name[:2]}/{name}"
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        ) as exc:
            raise StorageError(f"s3 {what} at {self.url} failed: {exc}") from exc

    def write(self, items: Sequence[tuple[BlockKey, Any, BlockMeta]]) -> list[bool]:
        records = [
            (key, _record.pack(key, block, self._codec, meta.expire_at))
            for key, block, meta in items
        ]
        with self._errors("put"):
            list(self._pool.map(lambda item: self._put(*item), records))
        return [True] * len(items)

    def _put(self, key: BlockKey, record: bytes) -> None:
        if len(record) > self.multipart_bytes:
            self._s3.upload_fileobj(
                io.BytesIO(record),
                self.bucket,
                self._object(key),
                Config=self._transfer,
            )
        else:
            self._s3.put_object(Bucket=self.bucket, Key=self._object(key), Body=record)

    def get(
        self, key: BlockKey, now: float | None = None
    ) -> np.ndarray[Any, Any] | None:
        try:
            with self._errors("get"):
                response = self._s3.get_object(
                    Bucket=self.bucket, Key=self._object(key)
                )
                data = response["Body"].read()
        except StorageError as exc:
            if _is_missing(exc):
                return None
            raise
        return _record.unpack(data, key, time.time() if now is None else now)

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._errors("head"):
            return list(self._pool.map(self._exists, keys))

    def _exists(self, key: BlockKey) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return False
            raise

    def delete(self, keys: Sequence[BlockKey]) -> int:
        present = sum(self.contains(keys))
        with self._errors("delete"):
            for start in range(0, len(keys), 1000):
                objects = [{"Key": self._object(k)} for k in keys[start : start + 1000]]
                self._s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
        return present

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._s3.close()


def _is_missing(exc: StorageError) -> bool:
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        return cause.response.get("Error", {}).get("Code") in _MISSING
    return False
