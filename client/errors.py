"""Exception types the client raises."""


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
