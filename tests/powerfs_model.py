"""The durability model behind powerfs (tests/powerfs.py): pure Python, no FUSE.

`DurabilityModel` tracks what a journaling filesystem would have on disk if the power went off now,
against what the running system sees (LazyFS, the FUSE filesystem Jepsen uses, is the model):

- per file, its content as of its last fsync/fdatasync, and the writes and truncates since then, in
  order, each write split into 4 KiB pages (the page cache writes pages back independently);
- per directory, its entries (name -> inode) as of its last fsync, and the entry operations since
  then, in order. A rename inside one directory is one operation (atomic); a rename between two
  directories is one operation in each, and a cut keeps both halves or neither; an fsync of either
  directory makes both durable (one journal transaction).

`crash` returns the tree a reboot could find: the durable state plus, per directory, a random prefix
of its unsynced entry operations and, per file, a random in-order subset of its unsynced pages and
truncates. A file whose directory entry survives but whose data does not comes back with its last
fsynced content (empty if it never was fsynced); a directory whose own entry does not survive takes its
subtree with it. fsync of a file never makes its directory entry durable: that needs an fsync of the
directory (fsync(2) says so), however a given filesystem's journal happens to behave.

`Trigger` says when powerfs cuts the power.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Union

PAGE = 4096
ROOT_INO = 1
SURVIVOR_MODES = ("random", "drop", "keep")


@dataclass(frozen=True)
class Symlink:
    """A symbolic link in a survivor tree."""

    target: str


Tree = dict[str, Union[bytes, Symlink, "Tree"]]
"""A survivor tree: name -> file content, symlink, or directory (a nested Tree)."""


@dataclass
class DirOp:
    """One change to a directory's entries: remove `removes`, then add `adds` (name, inode).
    A rename inside one directory is one DirOp with both; a rename between two directories is a DirOp
    in each, with the same `seq` and each naming the other directory as `partner`."""

    seq: int
    removes: str | None = None
    adds: tuple[str, int] | None = None
    partner: int | None = None

    def apply(self, entries: dict[str, int]) -> None:
        """Apply this change to `entries`."""
        if self.removes is not None:
            entries.pop(self.removes, None)
        if self.adds is not None:
            entries[self.adds[0]] = self.adds[1]


@dataclass
class DataOp:
    """One change to a file's content: a write of `data` at `offset` (at most one page), or, with
    `data` None, a truncate to `offset` bytes."""

    offset: int
    data: bytes | None = None

    def apply(self, content: bytearray) -> None:
        """Apply this change to `content`."""
        if self.data is None:
            if self.offset < len(content):
                del content[self.offset :]
            else:
                content.extend(bytes(self.offset - len(content)))
            return
        if self.offset > len(content):
            content.extend(bytes(self.offset - len(content)))
        content[self.offset : self.offset + len(self.data)] = self.data


@dataclass
class Inode:
    """A file, directory or symlink: what is durable, what is pending, and (for directories) what the
    running system sees now."""

    kind: str
    """"file", "dir" or "symlink"."""
    durable_data: bytearray = field(default_factory=bytearray)
    pending_data: list[DataOp] = field(default_factory=list)
    durable_entries: dict[str, int] = field(default_factory=dict)
    pending_entries: list[DirOp] = field(default_factory=list)
    entries: dict[str, int] = field(default_factory=dict)
    """The directory's entries as the running system sees them."""
    target: str = ""
    """A symlink's target (durable with the link's directory entry)."""


class DurabilityModel:
    """What a journaling filesystem holds on disk, against what the running system sees.

    Namespace operations take paths relative to the filesystem root ("/a/b"); data operations take the
    inode number that `lookup` returned when the file was opened (it stays valid across renames and
    unlinks, like an open file). Call each only after the real operation succeeded."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {ROOT_INO: Inode("dir")}
        self._next_ino = itertools.count(ROOT_INO + 1)
        self._next_seq = itertools.count(1)

    @classmethod
    def scan(cls, backing: str) -> DurabilityModel:
        """A model of the tree under `backing`, all of it durable (the state after a clean boot)."""
        model = cls()

        def visit(path: str, ino: int) -> None:
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                if entry.is_symlink():
                    child = model._new(Inode("symlink", target=os.readlink(entry.path)))
                elif entry.is_dir():
                    child = model._new(Inode("dir"))
                    visit(entry.path, child)
                elif not entry.is_file():
                    continue  # sockets, fifos, devices: none on a checkpoint root
                else:  # (a hard-linked file becomes one copy per name)
                    with open(entry.path, "rb") as f:
                        child = model._new(Inode("file", durable_data=bytearray(f.read())))
                node = model.inodes[ino]
                node.entries[entry.name] = child
                node.durable_entries[entry.name] = child

        visit(backing, ROOT_INO)
        return model

    # -- namespace -----------------------------------------------------------------------------------

    def lookup(self, path: str) -> int:
        """The inode `path` names now; raises FileNotFoundError."""
        ino = ROOT_INO
        for name in _components(path):
            node = self.inodes[ino]
            if node.kind != "dir" or name not in node.entries:
                raise FileNotFoundError(errno.ENOENT, "not in the model", path)
            ino = node.entries[name]
        return ino

    def create(self, path: str, kind: str, target: str = "") -> int:
        """A new file, directory or symlink at `path`; returns its inode."""
        parent, name = self._parent(path)
        ino = self._new(Inode(kind, target=target))
        self._change(parent, DirOp(next(self._next_seq), adds=(name, ino)))
        return ino

    def link(self, existing: str, new: str) -> None:
        """A hard link `new` to the file `existing`."""
        ino = self.lookup(existing)
        parent, name = self._parent(new)
        self._change(parent, DirOp(next(self._next_seq), adds=(name, ino)))

    def remove(self, path: str) -> None:
        """unlink or rmdir: the entry goes (the inode lives on while a durable entry may name it)."""
        parent, name = self._parent(path)
        self._change(parent, DirOp(next(self._next_seq), removes=name))

    def rename(self, old: str, new: str) -> None:
        """rename(2), replacing `new` if it exists: atomic inside one directory; two linked changes
        between two directories."""
        ino = self.lookup(old)
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        if self.inodes[new_parent].entries.get(new_name) == ino:
            return  # two links to one inode: rename(2) does nothing
        seq = next(self._next_seq)
        if old_parent == new_parent:
            self._change(old_parent, DirOp(seq, removes=old_name, adds=(new_name, ino)))
            return
        self._change(old_parent, DirOp(seq, removes=old_name, partner=new_parent))
        self._change(new_parent, DirOp(seq, adds=(new_name, ino), partner=old_parent))

    # -- data ----------------------------------------------------------------------------------------

    def write(self, ino: int, offset: int, data: bytes) -> None:
        """A write of `data` at `offset`, kept as one change per page it touches."""
        node = self.inodes[ino]
        position = 0
        while position < len(data):
            start = offset + position
            end = min(offset + len(data), (start // PAGE + 1) * PAGE)
            node.pending_data.append(DataOp(start, bytes(data[position : position + end - start])))
            position += end - start

    def truncate(self, ino: int, length: int) -> None:
        """truncate/ftruncate (or O_TRUNC) to `length` bytes."""
        self.inodes[ino].pending_data.append(DataOp(length))

    # -- durability ----------------------------------------------------------------------------------

    def fsync(self, ino: int) -> None:
        """fsync/fdatasync of a file (its content) or fsync of a directory (its entries; the other half
        of a rename between directories becomes durable with it, as one journal transaction)."""
        node = self.inodes[ino]
        if node.kind == "dir":
            self._persist_dir(ino, node.pending_entries[-1].seq if node.pending_entries else 0)
            return
        for op in node.pending_data:
            op.apply(node.durable_data)
        node.pending_data.clear()

    def crash(self, rng: random.Random, mode: str = "random") -> Tree:
        """The tree a reboot would find: the durable state plus what `mode` keeps of the rest
        ("random": per directory a random prefix of its pending changes, per file a random in-order
        subset of its pending pages and truncates; "drop": nothing; "keep": everything)."""
        if mode not in SURVIVOR_MODES:
            raise ValueError(f"survivor mode must be one of {SURVIVOR_MODES}, not {mode!r}")
        kept = {
            ino: _choose_prefix(rng, len(node.pending_entries), mode)
            for ino, node in self.inodes.items()
            if node.kind == "dir"
        }
        self._keep_renames_whole(kept)
        contents: dict[int, bytes] = {}

        def content(ino: int) -> bytes:
            if ino not in contents:
                node = self.inodes[ino]
                data = bytearray(node.durable_data)
                for op in _choose_subset(rng, node.pending_data, mode):
                    op.apply(data)
                contents[ino] = bytes(data)
            return contents[ino]

        def tree(ino: int, seen: frozenset) -> Tree:
            node = self.inodes[ino]
            entries = dict(node.durable_entries)
            for op in node.pending_entries[: kept[ino]]:
                op.apply(entries)
            result: Tree = {}
            for name, child in sorted(entries.items()):
                kind = self.inodes[child].kind
                if kind == "dir":
                    if child not in seen:  # a cycle can only come from a model bug; never loop on it
                        result[name] = tree(child, seen | {child})
                elif kind == "symlink":
                    result[name] = Symlink(self.inodes[child].target)
                else:
                    result[name] = content(child)
            return result

        return tree(ROOT_INO, frozenset({ROOT_INO}))

    # -- internals -----------------------------------------------------------------------------------

    def _new(self, node: Inode) -> int:
        ino = next(self._next_ino)
        self.inodes[ino] = node
        return ino

    def _parent(self, path: str) -> tuple[int, str]:
        parts = _components(path)
        if not parts:
            raise PermissionError(errno.EPERM, "the root has no parent", path)
        parent = self.lookup("/" + "/".join(parts[:-1]))
        if self.inodes[parent].kind != "dir":
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return parent, parts[-1]

    def _change(self, dir_ino: int, op: DirOp) -> None:
        node = self.inodes[dir_ino]
        op.apply(node.entries)
        node.pending_entries.append(op)

    def _persist_dir(self, ino: int, seq: int) -> None:
        """Make every pending change of directory `ino` up to `seq` durable, and with each half of a
        rename between directories, the other directory's changes up to that rename."""
        node = self.inodes[ino]
        while node.pending_entries and node.pending_entries[0].seq <= seq:
            op = node.pending_entries.pop(0)
            op.apply(node.durable_entries)
            if op.partner is not None:
                self._persist_dir(op.partner, op.seq)

    def _keep_renames_whole(self, kept: dict[int, int]) -> None:
        """Shorten the kept prefixes until every rename between directories is kept in both or neither."""
        changed = True
        while changed:
            changed = False
            for ino, count in kept.items():
                for index, op in enumerate(self.inodes[ino].pending_entries[:count]):
                    if op.partner is None:
                        continue
                    partner = self.inodes[op.partner].pending_entries
                    position = next((i for i, other in enumerate(partner) if other.seq == op.seq), None)
                    if position is not None and position >= kept[op.partner]:
                        kept[ino] = index
                        changed = True
                        break


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _choose_prefix(rng: random.Random, count: int, mode: str) -> int:
    """How many of `count` pending directory changes survive: all, none, or a random prefix (a third
    of the time each, so both extremes come up often)."""
    if mode == "keep":
        return count
    if mode == "drop" or count == 0:
        return 0
    draw = rng.random()
    return count if draw < 1 / 3 else 0 if draw < 2 / 3 else rng.randint(0, count)


def _choose_subset(rng: random.Random, ops: list[DataOp], mode: str) -> list[DataOp]:
    """Which pending data changes survive, in order: all, none, or each with even odds."""
    if mode == "keep":
        return ops
    if mode == "drop" or not ops:
        return []
    draw = rng.random()
    if draw < 1 / 3:
        return ops
    if draw < 2 / 3:
        return []
    return [op for op in ops if rng.random() < 0.5]


def write_tree(tree: Tree, destination: str) -> None:
    """Create `destination` (must not exist) holding `tree`."""
    os.mkdir(destination)
    for name, node in tree.items():
        path = os.path.join(destination, name)
        if isinstance(node, dict):
            write_tree(node, path)
        elif isinstance(node, Symlink):
            os.symlink(node.target, path)
        else:
            with open(path, "wb") as f:
                f.write(node)


@dataclass
class Trigger:
    """Cut `when` ("before" or "after") the `nth` operation whose line matches `pattern` (any
    operation when `pattern` is None)."""

    when: str
    pattern: re.Pattern | None = None
    nth: int = 1

    @classmethod
    def from_command(cls, spec: dict[str, Any]) -> Trigger:
        """The trigger a control command's "arm" value describes."""
        if "after_ops" in spec:
            return cls("after", None, int(spec["after_ops"]))
        for when in ("before", "after"):
            if when in spec:
                return cls(when, re.compile(spec[when]), int(spec.get("nth", 1)))
        raise ValueError(f"cannot arm {spec!r}: give after_ops, before or after")

    def counts(self, line: str) -> bool:
        """Count `line` if it matches; True when this was the `nth` match."""
        if self.pattern is not None and not self.pattern.search(line):
            return False
        self.nth -= 1
        return self.nth == 0
