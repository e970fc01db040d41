"""Exception types of the daemon and the `ckptd` command line."""

from __future__ import annotations

from ckptd.proto.errors import CodedError


class DaemonError(Exception):
    """The daemon cannot start or keep serving (another daemon owns the root, bad endpoint, ...)."""


class DaemonConfigError(DaemonError):
    """The daemon's settings are inconsistent or incomplete."""


class ClusterSecretError(Exception):
    """The cluster secret file is missing, unreadable, too short or readable by other users."""


class SaveRejected(CodedError):
    """A rank's part cannot be accepted; its code says whether the step is aborted too."""


class OwnershipRefused(CodedError):
    """A client's run may not use the root now (ROOT_IN_USE, or ROOT_CLAIM_PENDING: ask again)."""


class RegionError(Exception):
    """A region named in a save request cannot be mapped as asked."""


class CommitRejected(Exception):
    """The save cannot commit; the message names the reason for every rank."""


class ExportError(Exception):
    """The export cannot be made; the message says why and what to do."""
