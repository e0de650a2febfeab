"""Where output and uploaded files live: a local directory by default, S3-compatible storage at scale.

Keys are URL-safe relative paths such as ``outputs/2026/11/20/<uuid>.png``; the API serves them at
``{base_url}/files/{key}``. ``open_storage`` takes a directory path or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import mimetypes
import os
import re
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

CONTENT_TYPE_EXTENSIONS: dict[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/avif": ".avif",
    "image/gif": ".gif",
    "application/json": ".json",
    "text/plain": ".txt",
    "application/octet-stream": ".bin",
}
EXTENSION_CONTENT_TYPES: dict[str, str] = {ext: ct for ct, ext in CONTENT_TYPE_EXTENSIONS.items()}
EXTENSION_CONTENT_TYPES[".jpeg"] = "image/jpeg"

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
SIDECAR_SUFFIX = ".content-type"


def extension_for(content_type: str) -> str:
    base = content_type.split(";")[0].strip().lower()
    return CONTENT_TYPE_EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ".bin"


def content_type_for(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return EXTENSION_CONTENT_TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def safe_filename(filename: str) -> str:
    """A user-supplied file name reduced to URL-safe characters (directory parts dropped), never one that
    reads as a content-type sidecar (``photo.content-type`` is kept as ``photo.content-type-``)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("-", name).strip(".-")[:120] or "file"
    return f"{name}-" if name.endswith(SIDECAR_SUFFIX) else name


def check_key(key: str) -> str:
    """The key if it is a well-formed relative path with URL-safe parts; KeyError otherwise."""
    parts = key.split("/")
    if not key or len(key) > 512 or not all(_SAFE_PART.match(p) for p in parts) or key.endswith(SIDECAR_SUFFIX):
        raise KeyError(key)
    return key


def new_key(content_type: str, prefix: str = "outputs", filename: str | None = None) -> str:
    """``prefix/YYYY/MM/DD/<uuid>.<ext>``, or ``prefix/YYYY/MM/DD/<uuid>/<filename>`` to keep a name."""
    prefix = "/".join(safe_filename(p) for p in prefix.strip("/").split("/") if p) or "files"
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    unique = uuid.uuid4().hex
    if filename:
        return f"{prefix}/{day}/{unique}/{safe_filename(filename)}"
    return f"{prefix}/{day}/{unique}{extension_for(content_type)}"


class Storage:
    """put/get/delete/exists on URL-safe keys."""

    def put(self, data: bytes, content_type: str, prefix: str = "outputs", filename: str | None = None) -> str:
        raise NotImplementedError

    def put_at(self, key: str, data: bytes, content_type: str) -> None:
        """Write at a key chosen earlier (e.g. a reserved upload slot), replacing what is there."""
        raise NotImplementedError

    def get(self, key: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError


class LocalStorage(Storage):
    """Files under one directory. Writes are atomic (temporary file + ``os.replace``); the content type comes
    from the extension, or from a ``<file>.content-type`` sidecar when the extension does not tell it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file behind a key (it may not exist); KeyError for a malformed key."""
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise KeyError(key)
        return path

    def put(self, data: bytes, content_type: str, prefix: str = "outputs", filename: str | None = None) -> str:
        key = new_key(content_type, prefix, filename)
        self.put_at(key, data, content_type)
        return key

    def put_at(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if content_type_for(path.name) != content_type.split(";")[0].strip().lower():
            _atomic_write(sidecar, content_type.encode())
        else:
            sidecar.unlink(missing_ok=True)
        _atomic_write(path, data)

    def get(self, key: str) -> tuple[bytes, str]:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        try:
            content_type = sidecar.read_text().strip()
        except FileNotFoundError:
            content_type = content_type_for(path.name)
        return data, content_type

    def delete(self, key: str) -> None:
        path = self.path(key)
        for p in (path, path.with_name(path.name + SIDECAR_SUFFIX)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except KeyError:
            return False


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class S3Storage(Storage):
    """Objects in an S3-compatible bucket under an optional prefix. The endpoint comes from
    ``FLUXSERVE_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL`` (MinIO, R2, ...); credentials the usual boto3 way."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint_url = endpoint_url or os.environ.get("FLUXSERVE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or None)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> S3Storage:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"storage URL {url!r} names no bucket; expected s3://bucket/prefix")
        return cls(bucket, prefix, **kwargs)

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}')"

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, data: bytes, content_type: str, prefix: str = "outputs", filename: str | None = None) -> str:
        key = new_key(content_type, prefix, filename)
        self.put_at(key, data, content_type)
        return key

    def put_at(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> tuple[bytes, str]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        return obj["Body"].read(), obj.get("ContentType") or content_type_for(key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except KeyError:
            return False
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True


def open_storage(location: str) -> Storage:
    """A directory path (``file://`` allowed) or ``s3://bucket/prefix``."""
    if location.startswith("s3://"):
        return S3Storage.from_url(location)
    return LocalStorage(location.removeprefix("file://"))
