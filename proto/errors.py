"""The errors both sides name on the wire: one (code, message) base class and the codes.

A daemon answers a request it refuses with an ERROR frame holding a code and a message. The code
says what kind of refusal it is; `ErrorCode.aborts_save` says whether the refusal of a rank's part
also aborts that step for every rank (an invalid part does; "busy" or "already committed" do not).
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Machine-readable reasons in ERROR replies (the value travels on the wire)."""

    BAD_MESSAGE = "bad_message"
    """Not a msgpack map with v, type, id and body, or too large."""
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_NAME = "invalid_name"
    """A key, group or region name that is not a safe file name."""
    INVALID_REQUEST = "invalid_request"
    """Fields of the wrong type or out of range, or a part inconsistent with the others."""
    BAD_REGION = "bad_region"
    """A shared-memory region that is missing or not the sender's own."""
    EXPIRED = "expired"
    """A hand-over that arrived after the client stopped waiting for it."""
    DUPLICATE = "duplicate"
    ABORTED = "aborted"
    """A part of a step that is already aborted."""
    CONFLICT = "conflict"
    """A step that is already committed."""
    WRONG_ROOT = "wrong_root"
    WRONG_NODE = "wrong_node"
    UNSUPPORTED = "unsupported"
    IO_ERROR = "io_error"
    BUSY = "busy"
    """Too many saves in flight: ask again later."""
    SHUTTING_DOWN = "shutting_down"
    """The daemon is draining before it exits: ask again (a restarted daemon may answer)."""
    ROOT_IN_USE = "root_in_use"
    """Another live run owns the root."""
    ROOT_CLAIM_PENDING = "root_claim_pending"
    """Another host's recent claim on the root is being watched: ask again."""
    WRONG_DAEMON = "wrong_daemon"
    """A save request addressed to another instance of the daemon (this one started since): refused
    unread; ask again."""
    UNKNOWN_PLAN = "unknown_plan"
    """A planned save naming a plan this daemon does not hold (restarted, or the plan was evicted):
    send the full request again."""
    INTERNAL = "internal"

    @property
    def aborts_save(self) -> bool:
        """Whether refusing a rank's part with this code also aborts the step for every rank."""
        return self not in _KEEPS_THE_SAVE


_KEEPS_THE_SAVE = frozenset(
    {
        ErrorCode.ABORTED,
        ErrorCode.WRONG_DAEMON,
        ErrorCode.CONFLICT,
        ErrorCode.DUPLICATE,
        ErrorCode.WRONG_ROOT,
        ErrorCode.BUSY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.ROOT_IN_USE,
        ErrorCode.ROOT_CLAIM_PENDING,
        ErrorCode.UNKNOWN_PLAN,
    }
)


class CodedError(Exception):
    """An error that travels as (code, message)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(CodedError):
    """A frame the receiver cannot accept."""
