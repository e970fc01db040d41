"""Exception types the client raises (every one a CheckpointError)."""


class CheckpointError(Exception):
    """A save or load failed; the message says what happened and what to do."""


class UnsupportedStateError(CheckpointError):
    """A state dict holds a value ckptd cannot store (named by its key path)."""


class DaemonUnavailableError(CheckpointError):
    """No ckptd daemon answered at the endpoint, and none could be started."""


class VerificationError(CheckpointError):
    """A checkpoint file is missing, truncated, or does not match its manifest checksum."""


class RootInUseError(CheckpointError):
    """Another live run of a job owns the checkpoint root; the message names it (run id, host, pid, start)."""


class CheckpointSkipped(CheckpointError):
    """The save was skipped because the previous one still held the staging pool (policy 'skip')."""


class PoolBusyError(CheckpointError):
    """The staging pool still holds the previous save and the policy says skip."""


class DaemonRequestError(CheckpointError):
    """The daemon answered a request with an error; `code` is its reason as sent (an ErrorCode value)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnsupportedFrameworkError(CheckpointError):
    """A training framework (Lightning, transformers, Accelerate) is installed at a version outside
    the range a ckptd integration supports; the message names both."""
