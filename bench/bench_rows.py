"""The bench's rows: which ways of saving it measures, how each is labelled, which class runs it,
whether the installed torch/ckptd can run it, and when a row's result counts as disturbed.

The savers themselves live in bench_limits.py (memcpy and write limits), bench_peers.py
(torch.save, torch.distributed.checkpoint) and bench_ckptd.py (ckptd); this module only names them.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple, Type

from bench_ckptd import CkptdOverlapSaver, CkptdSaver
from bench_limits import ChecksummedDirectWriteSaver, DirectWriteSaver, MemcpySaver, WriteSaver
from bench_peers import DcpAsyncBestSaver, DcpAsyncDefaultSaver, DcpSaver, TorchSaveSaver
from bench_saver import Saver

RESULT_MARK = "@@bench-row "  # a row process prints its result on one line after this mark
DISTURBED = 0.10  # other processes used more than this share of the machine during a row's saves

# (id, label shown in the table)
ROWS: List[Tuple[str, str]] = [
    ("memcpy", "memcpy limit"),
    ("write", "write+fsync limit"),
    ("write_direct", "O_DIRECT write+fsync"),
    ("write_direct_checksummed", "O_DIRECT write+fsync, checksummed"),
    ("torch_save", "torch.save + fsync"),
    ("dcp_save", "dcp.save"),
    ("dcp_async_default", "dcp.async_save default"),
    ("dcp_async_best", "dcp.async_save best"),
    ("ckptd", "ckptd"),
    ("ckptd_overlap", "ckptd overlap"),
]
LABELS = dict(ROWS)
ROW_IDS = [r for r, _ in ROWS]
BLOCKING_ROWS = {"memcpy", "write", "write_direct", "write_direct_checksummed", "torch_save", "dcp_save"}
LOAD_ROWS = {"torch_save": "torch.load", "dcp_save": "dcp.load", "ckptd": "ckptd load_checkpoint()"}
DEFAULT_ROWS_B = ["memcpy", "dcp_async_best", "ckptd", "ckptd_overlap"]
# The rows the training-lost floors are built from (write: where O_DIRECT is refused; the checksummed
# write: the floor of a saver whose files verify), run for state A whenever a ckptd row is.
FLOOR_ROWS = ["memcpy", "write", "write_direct", "write_direct_checksummed"]
# The rows that also take their saves in turn with the floor's, in their own process (the targets' ratios).
INTERLEAVED_ROWS = {"ckptd", "ckptd_overlap"}

SAVERS: Dict[str, Type[Saver]] = {
    "memcpy": MemcpySaver,
    "write": WriteSaver,
    "write_direct": DirectWriteSaver,
    "write_direct_checksummed": ChecksummedDirectWriteSaver,
    "torch_save": TorchSaveSaver,
    "dcp_save": DcpSaver,
    "dcp_async_default": DcpAsyncDefaultSaver,
    "dcp_async_best": DcpAsyncBestSaver,
    "ckptd": CkptdSaver,
    "ckptd_overlap": CkptdOverlapSaver,
}


def parse_rows(text: str) -> List[str]:
    """Row ids from a comma-separated --rows value (or 'all'), in table order; exits on unknown ids."""
    if text.strip() == "all":
        return list(ROW_IDS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_IDS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROW_IDS} or 'all'")
    return [r for r in ROW_IDS if r in rows]


def with_floor_rows(rows: List[str]) -> List[str]:
    """`rows`, plus the floor's rows when a ckptd row is among them, in table order."""
    if not {"ckptd", "ckptd_overlap"} & set(rows):
        return list(rows)
    return [r for r in ROW_IDS if r in rows or r in FLOOR_ROWS]


def _dcp_best_unavailable(dcp: Any) -> Optional[str]:
    """Why `dcp.async_save best` (a kept DefaultStager, DCP's checkpoint process) cannot run, or None."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    except ImportError as exc:
        return f"no DefaultStager/StagingOptions/AsyncCheckpointerType in this torch ({exc})"
    if not hasattr(AsyncCheckpointerType, "PROCESS"):
        return "AsyncCheckpointerType.PROCESS is missing in this torch"
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return "async_save takes no async_stager in this torch"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    return None


def _dcp_unavailable(row: str) -> Optional[str]:
    """Why a torch.distributed.checkpoint row cannot run with this torch, or None."""
    import torch.distributed.checkpoint as dcp

    if row == "dcp_save" and not hasattr(dcp, "save"):
        return "torch.distributed.checkpoint.save is missing in this torch"
    if row != "dcp_save" and not hasattr(dcp, "async_save"):
        return "torch.distributed.checkpoint.async_save is missing in this torch"
    if row == "dcp_async_best":
        return _dcp_best_unavailable(dcp)
    return None


def _ckptd_overlap_unavailable() -> Optional[str]:
    """Why `ckptd overlap` cannot run with this ckptd, or None."""
    from ckptd.client import CheckpointManager

    if "overlap" not in inspect.signature(CheckpointManager.save_checkpoint).parameters:
        return "save_checkpoint(step, overlap=True) is not implemented in this ckptd"
    return None


def row_unavailable(row: str) -> Optional[str]:
    """Why this row cannot run with the installed torch/ckptd (printed as n/a), or None."""
    try:
        if row in ("dcp_save", "dcp_async_default", "dcp_async_best"):
            reason = _dcp_unavailable(row)
            if reason is not None:
                return reason
        if row == "ckptd_overlap":
            return _ckptd_overlap_unavailable()
    except ImportError as exc:
        return f"import failed: {exc}"
    return None


def outside_load(result: Dict[str, Any]) -> float:
    """The share of the machine other processes (and the hypervisor, as steal) took during a row's saves."""
    return (result.get("other_load") or 0.0) + (result.get("steal") or 0.0)


def is_disturbed(result: Optional[Dict[str, Any]]) -> bool:
    """Whether other processes or steal took more than DISTURBED of the machine during this row's saves."""
    if not result:
        return False
    return (result.get("other_load") or 0) > DISTURBED or (result.get("steal") or 0) > DISTURBED
