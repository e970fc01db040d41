"""Gathering the files a node lacks from the other nodes, for a load from node-local roots.

With `--node-local-root` each node's root holds the files its own ranks wrote (and, with
`--replicate-to-partner`, the previous node's under `partner/`); the files a rank loads may live on
other nodes (rank 0's GLOBAL state, a replaced node's own state held by its partner). Every rank
calls `assemble_from_nodes` for the same step, in the same order: the ranks agree, with a few
collectives, on which node lacks which file and which rank holds it; each holder checks the file
against the manifest and sends it (point-to-point, over a gloo group); the lowest rank of the
needing node checks what arrives and puts it, with hard links to the files the node does hold, into
a tmp directory of its root that every rank of the node then reads as the checkpoint.

A file that no node holds intact leaves its node without a copy of the step: those ranks read the
next tier (the caller's fallback) and say so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ckptd.disk.files import FileProblem, check_listed_file, map_listed_file
from ckptd.disk.manifests import manifest_path
from ckptd.disk.root import checkpoint_path, partner_root
from ckptd.proto import layout
from ckptd.proto.manifest import FileRecord, Manifest, ManifestError

log = logging.getLogger(__name__)

TRANSFER_CHUNK = 64 << 20
"""Bytes per point-to-point send of a file."""
MAX_ROUNDS = 3
"""Holders asked for one file at most (a node keeps its own copy, and its partner another)."""

NeededFiles = Callable[[Manifest], Set[str]]
"""The paths (in the checkpoint) of the files this rank reads, given the checkpoint's manifest."""


@dataclass(frozen=True)
class Transfer:
    """One file sent from a rank that holds it to the lowest rank of a node that lacks it."""

    path: str
    sender: int
    receiver: int


@dataclass
class Assembly:
    """This rank's view of a step gathered from the nodes: the directory to read (None: this rank's
    node holds everything its ranks need where it is), and what could not be had."""

    directory: Optional[str]
    problems: List[str]
    owner: bool = False
    """This rank made the directory (the lowest rank of its node)."""

    def remove(self) -> None:
        """Remove the gathered directory (call once every rank of the node has read it)."""
        if self.owner and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def local_copies(root: str, step: int) -> List[str]:
    """The directories of this node's root that hold files of `step`: its own copy, then the copy it
    keeps for the previous node."""
    found = [checkpoint_path(root, step), checkpoint_path(partner_root(root), step)]
    return [path for path in found if os.path.isfile(manifest_path(path))]


def assemble_from_nodes(
    root: str, step: int, node_of: Callable[[int], int], needed: NeededFiles, group: Any
) -> Assembly:
    """Collective over `group` (every rank, same step): make the files this rank's node needs for
    `step` and lacks readable from one directory, taken from the ranks that hold them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    node = node_of(rank)
    copies = local_copies(root, step)
    manifest_json, manifest = _first_readable_manifest(copies)
    holders_of_manifest = _gather(group, world, manifest is not None)
    if not any(holders_of_manifest):
        return Assembly(None, [f"no node holds step {step} with a readable manifest"])
    if not all(holders_of_manifest):  # a node lost its copy: the lowest rank that has one sends the manifest
        src = holders_of_manifest.index(True)
        box = [manifest_json if rank == src else None]
        dist.broadcast_object_list(box, src=src, group=group)
        manifest_json = str(box[0])
        manifest = Manifest.from_json(manifest_json)  # the sender read it: it parses on every rank
    assert manifest is not None
    held = _held(copies, manifest)
    wants = needed(manifest)
    own_copy = checkpoint_path(root, step)
    elsewhere = any(not held[path].startswith(own_copy + os.sep) for path in wants if path in held)
    gathered = _gather(group, world, [sorted(wants - set(held)), elsewhere, uuid.uuid4().hex[:12]])
    lacking: List[List[str]] = [missing for missing, _, _ in gathered]
    wanted = sorted({path for paths in lacking for path in paths})
    if not wanted and not any(uses_partner for _, uses_partner, _ in gathered):
        return Assembly(None, [])  # every rank reads its node's own copy as it is
    holdings = _gather(group, world, sorted(set(wanted) & set(held)))
    owner = min(r for r in range(world) if node_of(r) == node)
    records = {record.path: record for record in manifest.files()}
    directory = None
    if any(lacking[r] or gathered[r][1] for r in range(world) if node_of(r) == node):
        token = gathered[0][2]  # rank 0's: the same name on every rank of the node
        directory = os.path.join(root, layout.tmp_dir_name(step, f"{layout.LOAD_TOKEN}{token}"))
    if directory is not None and rank == owner:
        try:
            _link_held(directory, held, manifest_json)
        except OSError as exc:  # the node's ranks then read an incomplete directory and go to the next tier
            log.warning("cannot gather step %d's files in %s: %s", step, directory, exc)
    unresolved: Dict[Tuple[int, str], str] = {}
    """(node, path) -> why the node still lacks the file."""
    refused: Set[Tuple[int, str]] = set()
    for _ in range(MAX_ROUNDS):  # a copy refused or damaged is asked of the next holder
        transfers, unheld = _plan(lacking, holdings, node_of, refused)
        for needing, paths in unheld.items():
            for path in paths:
                unresolved.setdefault((node_of(needing), path), f"no other node holds {path} intact")
        failed = _gather(group, world, _run_transfers(transfers, records, held, directory, rank, group))
        for transfer in transfers:
            unresolved.pop((node_of(transfer.receiver), transfer.path), None)
        lacking = [[] for _ in range(world)]
        for receiver, failures in enumerate(failed):
            for path, sender, problem in failures:
                refused.add((sender, path))
                lacking[receiver].append(path)
                unresolved[(node_of(receiver), path)] = problem
        if not any(lacking):
            break
    dist.barrier(group=group)  # the owner's files are in place before any rank of its node reads them
    if directory is None:
        return Assembly(None, [])
    problems = [why for (where, _), why in sorted(unresolved.items()) if where == node]
    return Assembly(directory, problems, owner=rank == owner)


def _plan(
    lacking: List[List[str]],
    holdings: List[List[str]],
    node_of: Callable[[int], int],
    refused: Set[Tuple[int, str]],
) -> Tuple[List[Transfer], Dict[int, List[str]]]:
    """Each node's missing files, each from the lowest rank of another node that holds it (and has
    not failed to send it: `refused`, (sender, path) pairs), to the lowest rank of the node; and
    what no such rank holds, by the rank that needs it. The same on every rank."""
    holders: Dict[str, List[int]] = {}
    for rank, paths in enumerate(holdings):
        for path in paths:
            holders.setdefault(path, []).append(rank)
    transfers: Dict[Tuple[int, str], Transfer] = {}
    unheld: Dict[int, List[str]] = {}
    for rank, paths in enumerate(lacking):
        owner = min(r for r in range(len(lacking)) if node_of(r) == node_of(rank))
        for path in paths:
            senders = [r for r in holders.get(path, []) if node_of(r) != node_of(rank) and (r, path) not in refused]
            if not senders:
                unheld.setdefault(rank, []).append(path)
                continue
            transfers.setdefault((owner, path), Transfer(path, senders[0], owner))
    return sorted(transfers.values(), key=lambda t: (t.receiver, t.path)), unheld


def _run_transfers(
    transfers: List[Transfer],
    records: Dict[str, FileRecord],
    held: Dict[str, str],
    directory: Optional[str],
    rank: int,
    group: Any,
) -> List[List[Any]]:
    """This rank's part of every transfer, in the one global order (so blocking sends cannot
    deadlock); returns, as a receiver, [path, sender, problem] for each file that did not arrive
    intact. A sender first checks the file against the manifest and sends a refusal instead of
    bytes that do not match."""
    failures: List[List[Any]] = []
    for transfer in transfers:
        record = records[transfer.path]
        if rank == transfer.sender:
            _send_file(held[transfer.path], record, transfer.receiver, group)
        elif rank == transfer.receiver:
            assert directory is not None
            problem = _receive_file(os.path.join(directory, record.path), record, transfer.sender, group)
            if problem:
                failures.append([transfer.path, transfer.sender, problem])
    return failures


def _send_file(path: str, record: FileRecord, receiver: int, group: Any) -> None:
    """Check the file against its record, then send it in chunks from a private mapping (memory stays
    bounded by the chunk, whatever the file's size); a file that does not match is refused."""
    try:
        mapped = map_listed_file(path, record, verify=True)
    except (FileProblem, OSError) as exc:
        log.warning("not sending %s to rank %d: %s", path, receiver, exc)
        dist.send(torch.tensor([0], dtype=torch.int64), receiver, group=group)
        return
    try:
        dist.send(torch.tensor([1], dtype=torch.int64), receiver, group=group)
        for offset in range(0, record.size, TRANSFER_CHUNK):
            count = min(TRANSFER_CHUNK, record.size - offset)
            dist.send(torch.frombuffer(mapped, dtype=torch.uint8, count=count, offset=offset), receiver, group=group)
    finally:
        mapped.close()


def _receive_file(destination: str, record: FileRecord, sender: int, group: Any) -> Optional[str]:
    """Receive a file in chunks, written as they come, then checked against its record. Every chunk
    is received even when writing fails (the sender would wait for it otherwise)."""
    ok = torch.zeros(1, dtype=torch.int64)
    dist.recv(ok, sender, group=group)
    if not ok.item():
        return f"rank {sender}'s copy of {record.path} does not match the manifest"
    chunk = torch.empty(min(TRANSFER_CHUNK, record.size), dtype=torch.uint8)
    failed: Optional[OSError] = None
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        out = open(destination, "wb")
    except OSError as exc:
        failed, out = exc, None
    for offset in range(0, record.size, TRANSFER_CHUNK):
        part = chunk[: min(TRANSFER_CHUNK, record.size - offset)]
        dist.recv(part, sender, group=group)
        if out is not None and failed is None:
            try:
                out.write(part.numpy().data)
            except OSError as exc:
                failed = exc
    if out is not None:
        out.close()
    if failed is not None:
        return f"{record.path} from rank {sender} could not be written to {destination}: {failed}"
    try:
        check_listed_file(destination, record)
    except FileProblem as exc:
        with contextlib.suppress(OSError):
            os.unlink(destination)
        return f"{record.path} from rank {sender} arrived damaged: {exc.reason}"
    return None


def _link_held(directory: str, held: Dict[str, str], manifest_json: Any) -> None:
    """The gathered directory: the manifest and a hard link to each file the node holds."""
    os.makedirs(directory, exist_ok=True)
    with open(manifest_path(directory), "w", encoding="utf-8") as f:
        f.write(str(manifest_json))
    for path, source in held.items():
        destination = os.path.join(directory, path)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.link(source, destination)


def _held(copies: List[str], manifest: Manifest) -> Dict[str, str]:
    """Path in the checkpoint -> where this node holds it (its own copy first)."""
    held: Dict[str, str] = {}
    for copy in copies:
        for record in manifest.files():
            where = os.path.join(copy, record.path)
            if record.path not in held and os.path.isfile(where):
                held[record.path] = where
    return held


def _gather(group: Any, world: int, value: Any) -> List[Any]:
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _first_readable_manifest(copies: List[str]) -> Tuple[Optional[str], Optional[Manifest]]:
    """The manifest of the first copy whose manifest reads and parses (text and parsed), else Nones.
    Decided before any collective: a damaged manifest on one node must not leave the others waiting."""
    for copy in copies:
        try:
            with open(manifest_path(copy), encoding="utf-8") as f:
                text = f.read()
            return text, Manifest.from_json(text)
        except (OSError, UnicodeDecodeError, ManifestError) as exc:
            log.warning("the manifest of %s cannot be read: %s", copy, exc)
    return None, None
