"""An object-store tier (S3 API, through boto3): checkpoints as objects under `s3://BUCKET/PREFIX/`,
with the layout and the commit protocol of a root.

`PREFIX/step_N/<file>` holds each listed file, uploaded first (multipart, in parallel, each object
carrying its manifest checksum as metadata and checked after upload); `PREFIX/step_N/`
`checkpoint_manifest.json` is uploaded last and is the commit marker; `PREFIX/latest` names the
newest step. A delete removes the manifest first, so a checkpoint is never seen half deleted.

Credentials and the endpoint come from the standard AWS environment and config files
(`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3`, ...); `endpoint_url` overrides the
endpoint (MinIO, Ceph RGW and other S3-compatible stores). boto3 is imported only when an
object-store tier is used: `pip install 'ckptd[s3]'`.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, List, Optional, Set

from ckptd.disk.files import CHECK_CHUNK, FileProblem
from ckptd.disk.manifests import write_manifest
from ckptd.disk.verify import Problem
from ckptd.proto import layout
from ckptd.proto.formats import Checksum
from ckptd.proto.manifest import FileRecord, Manifest, ManifestError
from ckptd.proto.tiers import S3Location

CHECKSUM_METADATA = "ckptd-checksum"
"""Object metadata holding the manifest checksum of the file the object was uploaded from."""
PART_BYTES = 64 * 1024 * 1024
"""Multipart part size, and the range of each ranged GET."""
CONCURRENCY = 8
"""Parts in flight at once, per file."""

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred."""


class ObjectStoreError(Exception):
    """The object store refused or failed an operation; the message says which, where and what to do."""


class ObjectStoreRoot:
    """A checkpoint root in an object store: list, commit, read, delete."""

    def __init__(self, url: str, endpoint_url: Optional[str] = None) -> None:
        try:
            import boto3  # type: ignore[import-untyped]
            from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]
        except ImportError:
            raise ObjectStoreError(f"the tier at {url} needs boto3: pip install 'ckptd[s3]'") from None
        self.location = S3Location.parse(url)
        self.url = str(self.location)
        config = Config(
            retries={"max_attempts": 8, "mode": "adaptive"},  # backoff with jitter between attempts
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=2 * CONCURRENCY,
        )
        # a session of its own: boto3's default session caches the credentials it first found
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=CONCURRENCY
        )

    def check(self) -> None:
        """Raise ObjectStoreError unless the bucket exists and these credentials may use it."""
        self._call("reach the bucket", self._client.head_bucket, Bucket=self.location.bucket)

    def committed_steps(self) -> List[int]:
        """Steps with a manifest under the prefix, oldest first."""
        steps = []
        paginator = self._client.get_paginator("list_objects_v2")
        prefix = self.location.key("") + ("/" if self.location.prefix else "")

        pages = self._call(
            "list checkpoints",
            _all_pages,
            paginator=paginator,
            Bucket=self.location.bucket,
            Prefix=prefix,
            Delimiter="/",
        )
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                step = layout.parse_checkpoint_dir_name(common["Prefix"][len(prefix) :].rstrip("/"))
                if step is not None and self._exists(self._manifest_key(step)):
                    steps.append(step)
        return sorted(steps)

    def is_committed(self, step: int) -> bool:
        """True if checkpoint `step` has its manifest here."""
        return self._exists(self._manifest_key(step))

    def latest_step(self) -> Optional[int]:
        """The step `latest` names, or None."""
        try:
            body = self._client.get_object(Bucket=self.location.bucket, Key=self.location.key(layout.LATEST_NAME))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._error("read latest", exc) from None
        return layout.parse_checkpoint_dir_name(body["Body"].read().decode(errors="replace").strip())

    def read_manifest(self, step: int) -> Manifest:
        """Checkpoint `step`'s manifest; raises ObjectStoreError or ManifestError."""
        data = self._call(
            f"read the manifest of step {step}",
            self._client.get_object,
            Bucket=self.location.bucket,
            Key=self._manifest_key(step),
        )["Body"].read()
        return Manifest.from_json(data.decode())

    def has_file(self, step: int, record: FileRecord) -> bool:
        """True if `record`'s object is here, complete, from a file with the same checksum (a copy
        interrupted after it need not upload it again)."""
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=self._file_key(step, record))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return False
            raise self._error(f"check {record.path} of step {step}", exc) from None
        size: int = head["ContentLength"]
        checksum: Optional[str] = head.get("Metadata", {}).get(CHECKSUM_METADATA)
        return size == record.size and checksum == record.checksum

    def upload_file(self, step: int, source: str, record: FileRecord, progress: Progress) -> None:
        """Upload one listed file (multipart, in parallel), then check the object's size and checksum."""
        key = self._file_key(step, record)
        self._call(
            f"upload {record.path} of step {step}",
            self._client.upload_file,
            Filename=source,
            Bucket=self.location.bucket,
            Key=key,
            ExtraArgs={"Metadata": {CHECKSUM_METADATA: record.checksum}},
            Config=self._transfer,
            Callback=progress,
        )
        if not self.has_file(step, record):
            raise ObjectStoreError(
                f"{self.url}: {key} does not match {record.path} after its upload (size or checksum); it is uploaded again"
            )

    def commit(self, step: int, manifest_json: str) -> None:
        """Upload the manifest (the commit marker: every listed file is already here), then move `latest`
        unless it names a newer step."""
        data = manifest_json.encode()
        self._call(
            f"commit step {step}",
            self._client.put_object,
            Bucket=self.location.bucket,
            Key=self._manifest_key(step),
            Body=data,
        )
        latest = self.latest_step()
        if latest is None or step > latest:
            name = (layout.checkpoint_dir_name(step) + "\n").encode()
            self._call(
                "move latest",
                self._client.put_object,
                Bucket=self.location.bucket,
                Key=self.location.key(layout.LATEST_NAME),
                Body=name,
            )

    def delete(self, step: int) -> None:
        """Delete checkpoint `step`: the manifest first (it stops counting as committed), then its files."""
        self._call(
            f"delete step {step}", self._client.delete_object, Bucket=self.location.bucket, Key=self._manifest_key(step)
        )
        self._delete_under(self.location.key(layout.checkpoint_dir_name(step)) + "/")

    def abort_interrupted_uploads(self) -> List[str]:
        """Abort the multipart uploads under the prefix that a stopped copy left (they cost storage);
        returns their keys."""
        response = self._call(
            "list interrupted uploads",
            self._client.list_multipart_uploads,
            Bucket=self.location.bucket,
            Prefix=self.location.key(""),
        )
        aborted = []
        for upload in response.get("Uploads", []) or []:
            key, upload_id = upload["Key"], upload["UploadId"]
            self._call(
                f"abort the upload of {key}",
                self._client.abort_multipart_upload,
                Bucket=self.location.bucket,
                Key=key,
                UploadId=upload_id,
            )
            aborted.append(key)
        return aborted

    def download(self, step: int, record: FileRecord, destination: str, progress: Optional[Progress] = None) -> None:
        """Fetch one listed file with parallel ranged GETs into `destination` (created), fsynced, and
        check it against the record's size and checksum; raises FileProblem on a mismatch."""
        key = self._file_key(step, record)
        fd = os.open(destination, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            os.ftruncate(fd, record.size)

            def fetch(start: int) -> None:
                end = min(start + PART_BYTES, record.size) - 1
                body = self._call(
                    f"read {record.path} of step {step}",
                    self._client.get_object,
                    Bucket=self.location.bucket,
                    Key=key,
                    Range=f"bytes={start}-{end}",
                )["Body"].read()
                if len(body) != end - start + 1:
                    raise FileProblem(
                        self._object_url(key), f"returned {len(body)} bytes for a range of {end - start + 1}"
                    )
                os.pwrite(fd, body, start)
                if progress is not None:
                    progress(len(body))

            with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(fetch, range(0, record.size, PART_BYTES)))
            os.fsync(fd)
            checksum = Checksum()
            for start in range(0, record.size, PART_BYTES):
                checksum.update(os.pread(fd, min(PART_BYTES, record.size - start), start))
            if checksum.hexdigest() != record.checksum:
                raise FileProblem(
                    self._object_url(key),
                    f"checksum {checksum.hexdigest()} does not match the manifest's {record.checksum}",
                )
        except BaseException:
            os.close(fd)
            os.unlink(destination)
            raise
        os.close(fd)

    def verify(self, step: int) -> List[Problem]:
        """Every problem with checkpoint `step` here: its manifest, and each listed object's size and
        checksum (read in full, not kept); [] when all match."""
        try:
            manifest = self.read_manifest(step)
        except (ObjectStoreError, ManifestError) as exc:
            return [Problem(self._object_url(self._manifest_key(step)), f"cannot be read: {exc}")]
        problems = []
        for record in manifest.files():
            key = self._file_key(step, record)
            try:
                body = self._call(f"read {key}", self._client.get_object, Bucket=self.location.bucket, Key=key)["Body"]
                checksum, size = Checksum(), 0
                for chunk in body.iter_chunks(CHECK_CHUNK):
                    checksum.update(chunk)
                    size += len(chunk)
            except ObjectStoreError as exc:
                problems.append(Problem(self._object_url(key), f"cannot be read: {exc}"))
                continue
            if size != record.size:
                problems.append(Problem(self._object_url(key), f"holds {size} bytes, the manifest says {record.size}"))
            elif checksum.hexdigest() != record.checksum:
                reason = f"checksum {checksum.hexdigest()} does not match the manifest's {record.checksum}"
                problems.append(Problem(self._object_url(key), reason))
        return problems

    def _object_url(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{key}"

    def _manifest_key(self, step: int) -> str:
        return self.location.key(layout.checkpoint_dir_name(step), layout.MANIFEST_NAME)

    def _file_key(self, step: int, record: FileRecord) -> str:
        return self.location.key(layout.checkpoint_dir_name(step), record.path)

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return False
            raise self._error(f"check {key}", exc) from None
        return True

    def _delete_under(self, prefix: str) -> None:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(
            "list for delete", _all_pages, paginator=paginator, Bucket=self.location.bucket, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self._call("delete", self._client.delete_objects, Bucket=self.location.bucket, Delete={"Objects": keys})

    def _call(self, what: str, action: Callable[..., Any], **arguments: Any) -> Any:
        """`action(**arguments)`, its failures as ObjectStoreError saying what could not be done."""
        try:
            return action(**arguments)
        except (ObjectStoreError, FileProblem, ManifestError):
            raise
        except Exception as exc:  # botocore's ClientError, NoCredentialsError, EndpointConnectionError, ...
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: Exception) -> ObjectStoreError:
        code = _code(exc)
        hint = {
            "NoSuchBucket": "the bucket does not exist: create it, or fix the tier's URL",
            "404": "the bucket or object does not exist: create the bucket, or fix the tier's URL",
            "InvalidAccessKeyId": "the access key is not known: check the AWS credentials",
            "SignatureDoesNotMatch": "the secret key is wrong: check the AWS credentials",
            "AccessDenied": "these credentials may not do this: check the bucket's policy",
            "403": "access denied: check the AWS credentials and the bucket's policy",
        }.get(code or "", "")
        if type(exc).__name__ == "NoCredentialsError":
            hint = "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        detail = f"{type(exc).__name__}: {exc}"
        return ObjectStoreError(f"cannot {what} at {self.url}: {detail}" + (f" ({hint})" if hint else ""))


def _all_pages(paginator: Any, **arguments: Any) -> List[Any]:
    return list(paginator.paginate(**arguments))


def _code(exc: Exception) -> Optional[str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


def fetch_checkpoint(
    root: ObjectStoreRoot, step: int, destination: str, wanted: Optional[Callable[[Manifest], Set[str]]] = None
) -> str:
    """Download checkpoint `step` from an object-store root into the new directory `destination`
    (files with parallel ranged GETs, each checked against the manifest, the manifest last), so it
    loads like a local checkpoint; returns `destination`. `wanted` picks the files (by path) a loader
    reads, from the manifest (default: all). Raises ObjectStoreError, FileProblem or ManifestError;
    the caller removes `destination` either way once it is done with it."""
    manifest = root.read_manifest(step)
    os.makedirs(destination)
    paths = wanted(manifest) if wanted is not None else None
    for record in manifest.files():
        if paths is not None and record.path not in paths:
            continue
        target = os.path.join(destination, record.path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        root.download(step, record, target)
    write_manifest(destination, manifest.to_json())
    return destination
