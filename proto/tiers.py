"""Storage tiers: the slower copies of a root's checkpoints that a daemon fills in the background.

The daemon's root is the fast tier: every save commits there. Each further tier is named on the
command line as `NAME=PATH[:every=N][:keep_last=K][:keep_every=M]` (`ckptd serve --tier`, or a
manager's `tiers=`), nearest first: every N-th committed step is copied into PATH (a directory, or
an object store as `s3://BUCKET/PREFIX`), which then keeps its own `latest` and applies its own
retention.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from ckptd.proto.layout import UnsafeNameError, check_safe_name
from ckptd.proto.retention import RetentionPolicy

ROOT_TIER = "root"
"""The name the daemon's root goes by among the tiers (the fast tier, where every save commits)."""

TIERS_FILE = "tiers.json"
"""Written into the root by its daemon: the tiers it fills, so that `ckptd ls ROOT` and friends find them."""

_KEYS = ("every", "keep_last", "keep_every")

S3_SCHEME = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class TierSpecError(ValueError):
    """A tier description that cannot be used; the message says what is wrong and the expected form."""


@dataclass(frozen=True)
class TierSpec:
    """One slower tier: its name, where it lives, which steps it gets, and what it keeps."""

    name: str
    path: str
    every: int = 1
    """Copy the committed steps divisible by this."""
    keep_last: Optional[int] = None
    keep_every: Optional[int] = None

    @property
    def retention(self) -> RetentionPolicy:
        """The tier's own retention (the newest copy is always kept)."""
        return RetentionPolicy(keep_last=self.keep_last, keep_every=self.keep_every)

    def wants(self, step: int) -> bool:
        """True if this tier gets a copy of checkpoint `step`."""
        return step % self.every == 0

    def to_arg(self) -> str:
        """The `--tier` form of this spec (parse_tier's inverse)."""
        options = [f"{key}={getattr(self, key)}" for key in _KEYS if getattr(self, key) is not None]
        return ":".join([f"{self.name}={self.path}", *options])


@dataclass(frozen=True)
class S3Location:
    """An object-store tier's bucket and key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        """`s3://bucket/some/prefix` -> S3Location; raises TierSpecError naming the problem."""
        if not url.startswith(S3_SCHEME):
            raise TierSpecError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
        if not _BUCKET.match(bucket):
            raise TierSpecError(f"{bucket!r} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise TierSpecError(f"the prefix {prefix!r} of {url} has an empty, '.' or '..' part")
        return cls(bucket, prefix)

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def is_object_store(path: str) -> bool:
    """True for a tier path that names an object store (`s3://...`)."""
    return path.startswith(S3_SCHEME)


def parse_tier(text: str) -> TierSpec:
    """Parse `NAME=PATH[:every=N][:keep_last=K][:keep_every=M]`; raises TierSpecError."""
    form = "expected NAME=PATH[:every=N][:keep_last=K][:keep_every=M], e.g. shared=/lustre/job:every=10:keep_last=5"
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise TierSpecError(f"tier {text!r}: {form}")
    try:
        check_safe_name(name, "tier name")
    except UnsafeNameError as exc:
        raise TierSpecError(f"tier {text!r}: {exc}") from None
    if name == ROOT_TIER:
        raise TierSpecError(f"tier {text!r}: {ROOT_TIER!r} is the daemon's root; name the tier otherwise")
    if is_object_store(rest):
        location, *options = rest[len(S3_SCHEME) :].split(":")
        try:
            path = str(S3Location.parse(S3_SCHEME + location))
        except TierSpecError as exc:
            raise TierSpecError(f"tier {text!r}: {exc}") from None
    else:
        path, *options = rest.split(":")
        if "://" in rest:
            raise TierSpecError(f"tier {text!r}: a tier is an absolute path or an s3:// URL")
        if not os.path.isabs(path):
            raise TierSpecError(f"tier {text!r}: the path must be absolute, not {path!r}")
        path = os.path.normpath(path)
    values: Dict[str, int] = {}
    for option in options:
        key, sep, raw = option.partition("=")
        if key not in _KEYS or not sep:
            raise TierSpecError(f"tier {text!r}: unknown option {option!r}; {form}")
        if key in values:
            raise TierSpecError(f"tier {text!r}: {key} is given twice")
        if not raw.isdigit() or int(raw) < 1:
            raise TierSpecError(f"tier {text!r}: {key} must be a positive integer, not {raw!r}")
        values[key] = int(raw)
    return TierSpec(name, path, **values)


def parse_tiers(texts: Sequence[str]) -> Tuple[TierSpec, ...]:
    """Parse several `--tier` values, nearest first; names and paths must be distinct."""
    tiers = tuple(parse_tier(text) for text in texts)
    for attribute in ("name", "path"):
        seen = [getattr(tier, attribute) for tier in tiers]
        twice = sorted({value for value in seen if seen.count(value) > 1})
        if twice:
            raise TierSpecError(f"two tiers have the same {attribute}: {', '.join(twice)}")
    return tiers
