"""GcfsOperations: the thin pyfuse3 adapter over GcFilesystem.

It converts bytes <-> str, nodes -> EntryAttributes, directory snapshots -> readdir replies,
and every error -> FUSEError. Nothing else: logic belongs in fs.py.

Invariant: only FUSEError leaves a handler. pyfuse3 lets any other exception end
`pyfuse3.main()`, which takes the mount down ("Transport endpoint is not connected"), so
`_guard` turns GcfsError into its errno, a deadline overrun into EIO, and anything unexpected
into EIO with a logged traceback (a bug: the tests fail on it, users keep their mount).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from .errors import GcfsError, NotFound, ReadOnly
from .fs import GcFilesystem
from .listing import Listing, ListingChildren
from .nodes import FileNode, GeneratedFileNode, Node, NodeKind, RemoteFileNode, SymlinkNode
from .tree import ObjectListDir, TableFile

if TYPE_CHECKING:
    from .content import RemoteFile

log = logging.getLogger(__name__)

T = TypeVar("T")
Ctx = pyfuse3.RequestContext

_MODES = {
    NodeKind.DIR: stat.S_IFDIR | 0o555,
    NodeKind.FILE: stat.S_IFREG | 0o444,
    NodeKind.SYMLINK: stat.S_IFLNK | 0o777,
}
# Answers that are not failures worth counting: a missing name, a missing xattr (`ls -l`
# asks for security.selinux on every file).
_NOT_ERRORS = frozenset({errno.ENOENT, pyfuse3.ENOATTR})
# Flags that ask to change a file; open() with any of them fails with EROFS.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class GcfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: GcFilesystem, *, op_timeout: float) -> None:
        super().__init__()
        self.fs = fs
        self.op_timeout = op_timeout
        self.uid, self.gid = os.getuid(), os.getgid()
        # The API exposes no timestamps for most objects; the mount time is the honest answer
        # to "when did this appear here" and keeps `make`-style tools stable.
        self.mount_time_ns = time.time_ns()
        self._open_files: dict[int, bytes] = {}
        self._open_remote: dict[int, RemoteFile] = {}
        self._open_dirs: dict[int, list[Node]] = {}
        # Handles of directories of a listing that may be huge: the generation they read
        # (pinned, so a refresh cannot delete it under them) and the directory.
        self._open_streams: dict[int, tuple[ObjectListDir, Listing]] = {}
        self._next_fh = 1
        # Set once the kernel's INIT has been answered (see init()).
        self.initialized = trio.Event()

    def init(self) -> None:
        # pyfuse3 calls this while it handles the kernel's INIT request and sends the reply
        # as soon as it returns, all on the trio thread: a task waiting for `initialized`
        # runs after the reply went out. The daemon then raises the mount's read_ahead_kb,
        # which the kernel would otherwise overwrite while processing that reply. Must not
        # raise (pyfuse3's contract); Event.set cannot.
        self.initialized.set()

    # -- the one translation point ------------------------------------------------------------

    async def _guard(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        stats = self.fs.api.stats
        stats.operations += 1
        try:
            with trio.fail_after(self.op_timeout):
                return await fn()
        except pyfuse3.FUSEError as exc:
            if exc.errno not in _NOT_ERRORS:
                stats.record_error(op, exc.errno)
            raise
        except GcfsError as exc:
            log.log(exc.log_level, "%s failed: %s", op, exc)
            if exc.errno not in _NOT_ERRORS:
                stats.record_error(op, exc.errno)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.TooSlowError:
            log.warning("%s did not finish within %g s; answering EIO", op, self.op_timeout)
            stats.record_error(op, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s: unexpected error; answering EIO", op)
            stats.record_error(op, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = _MODES[node.kind]
        attrs.st_nlink = 2 if node.kind is NodeKind.DIR else 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_size = node.size
        attrs.st_blksize = 4096
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.mount_time_ns
        attrs.entry_timeout = attrs.attr_timeout = 1.0 if node.volatile else self.fs.ttl
        if isinstance(node, TableFile):
            # A table's size is known once it is rendered for the current listings, which
            # for a large archive takes seconds (200,000 items: ~8 s of listing, ~7 s of
            # rendering): a directory listing must not wait for it. Attributes that expire
            # at once make the kernel ask getattr (which renders) before any stat or read
            # uses the size, so every size a program sees is true.
            attrs.attr_timeout = 0
        return attrs

    def _new_fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    # -- reading ------------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)

        async def run() -> pyfuse3.EntryAttributes:
            try:
                return self._attributes(await self.fs.lookup(parent_inode, text))
            except NotFound as exc:
                log.debug("lookup %d %r: %s", parent_inode, text, exc)
                # st_ino 0 is a negative entry: the kernel remembers the ENOENT for
                # entry_timeout, so a shell probing `.git` a hundred times asks us once.
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = self.fs.ttl
                return negative

        return await self._guard(f"lookup {parent_inode} {text!r}", run)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        async def run() -> pyfuse3.EntryAttributes:
            node = self.fs.node(inode)
            await self.fs.ready(node)  # a table: rendered for the current listings
            return self._attributes(node)

        return await self._guard(f"getattr {inode}", run)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        async def run() -> bytes:
            node = self.fs.node(inode)
            if not isinstance(node, SymlinkNode):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(node.target)

        return await self._guard(f"readlink {inode}", run)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        async def run() -> pyfuse3.FileInfo:
            if flags & _WRITE_FLAGS:
                raise ReadOnly(f"open {inode} for writing")
            node = self.fs.node(inode)
            if isinstance(node, RemoteFileNode):
                # While the listing that showed the file is younger than the TTL it vouches
                # for access, and cached bytes open with no request at all; otherwise the
                # /media/ URL is resolved now (once per open, not per read), which checks
                # access again: a revoked permission ends access within one TTL.
                vouched = self.fs.is_vouched_for(node)
                remote = await self.fs.content.open(node.url, check_access=not vouched)
                fh = self._new_fh()
                self._open_remote[fh] = remote
                # Files are immutable by pk: the kernel may keep its page cache across opens.
                return pyfuse3.FileInfo(fh=fh, keep_cache=True)
            if isinstance(node, TableFile):
                # A generated table (tree.TableFile): read back from the metadata store, or
                # rendered when its listing changed since it was stat-ed.
                fh = self._new_fh()
                self._open_files[fh] = await node.contents(self.fs)
                return pyfuse3.FileInfo(fh=fh, keep_cache=False)
            if not isinstance(node, FileNode | GeneratedFileNode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            fh = self._new_fh()
            # The handle keeps the bytes as they were at open(), so a listing refreshed in
            # the middle of a read cannot mix two versions of a file.
            self._open_files[fh] = node.data
            # Generated files change when their listing is fetched again (or, for the root
            # README, with the daemon's state): the kernel must drop its cached pages at every
            # open. pyfuse3's FileInfo keeps the cache unless told otherwise.
            # The root README's size may change within its 1 s attribute lifetime: direct I/O
            # makes the kernel read to our EOF instead of stopping at the size it cached.
            direct = node.volatile  # a stub README (LateFileNode) does not change once mounted
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct)

        return await self._guard(f"open {inode}", run)

    # pyfuse3 takes any contiguous buffer here (handlers.pxi: PyObject_GetBuffer with
    # PyBUF_CONTIG_RO, then fuse_reply_buf, which copies it into the kernel before the
    # handler's task runs on). A remote file's read is a memoryview of its block buffer: no
    # copy of the bytes in Python; RemoteFile.read pinned the buffer until this task yields
    # (buffers.lend), which is after the reply went out.
    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:  # type: ignore[override]
        async def run() -> memoryview | bytes:
            remote = self._open_remote.get(fh)
            if remote is not None:
                chunk = await remote.read(off, size)
            else:
                data = self._open_files.get(fh)
                if data is None:
                    raise pyfuse3.FUSEError(errno.EBADF)
                chunk = data[off : off + size]
            self.fs.api.stats.bytes_read += len(chunk)
            return chunk

        return await self._guard(f"read {fh}", run)

    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)
        remote = self._open_remote.pop(fh, None)
        if remote is not None:
            remote.close()

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        async def run() -> int:
            directory = self.fs.directory(inode)
            fh = self._new_fh()
            if isinstance(directory, ObjectListDir):
                # A listing that may be huge is read from the store as its pages arrive;
                # offsets are positions in the generation the handle pinned.
                children = await self.fs.children(directory)  # `gcfs refresh` walks it
                assert isinstance(children, ListingChildren)
                listing = children.listing
                self.fs.listings.pin(listing)
                self._open_streams[fh] = (directory, listing)
                return fh
            # A snapshot per handle: readdir offsets then index a list that cannot change
            # between two readdir calls, so no entry is skipped or repeated.
            self._open_dirs[fh] = await self.fs.listdir(inode)
            return fh

        return await self._guard(f"opendir {inode}", run)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        async def run() -> None:
            stream = self._open_streams.get(fh)
            if stream is not None:
                await self._readdir_listing(*stream, start_id, token)
                return
            entries = self._open_dirs.get(fh)
            if entries is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            for index in range(start_id, len(entries)):
                node = entries[index]
                attrs = self._attributes(node)
                if not pyfuse3.readdir_reply(token, os.fsencode(node.name), attrs, index + 1):
                    break
                # READDIRPLUS: each entry the kernel takes counts as a lookup.
                self.fs.inodes.remember(node)

        await self._guard(f"readdir {fh}", run)

    async def _readdir_listing(
        self, directory: ObjectListDir, listing: Listing, start: int, token: pyfuse3.ReaddirToken
    ) -> None:
        """Entries from position `start`: waits for the page that holds it (an empty reply
        would end the listing), then answers what is filled until the kernel's buffer is
        full."""
        rows = await listing.names_from(start)
        while rows:
            for position, pk in rows:
                node = self.fs.inodes.add(directory.child(pk, listing))
                if not pyfuse3.readdir_reply(
                    token, os.fsencode(pk), self._attributes(node), position + 1
                ):
                    return
                self.fs.inodes.remember(node)
            rows = listing.names(rows[-1][0] + 1)

    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)
        stream = self._open_streams.pop(fh, None)
        if stream is not None:
            self.fs.listings.unpin(stream[1])

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Plain dictionary work that cannot fail: no deadline needed.
        for inode, count in inode_list:
            self.fs.forget_inode(inode, count)

    # getxattr and listxattr skip `_guard`: `ls -l` asks every entry for an ACL attribute, so
    # on a 10,000-item directory they are 10,000 calls, and the deadline's cancel scope and the
    # bookkeeping were most of their cost (3.3 s of a warm `ls -l`). Both are dictionary look-ups
    # that cannot block or raise anything but FUSEError.

    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: Ctx) -> bytes:
        # Ours are all user.gc.*: the ACL and SELinux names `ls -l` asks of every entry are
        # answered without computing a listed node's attributes from its stored object.
        if not name.startswith(b"user.gc."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8")

    async def listxattr(self, inode: InodeT, ctx: Ctx) -> list[XAttrNameT]:
        return [XAttrNameT(os.fsencode(name)) for name in self._xattrs(inode)]

    def _xattrs(self, inode: int) -> dict[str, str]:
        node = self.fs.inodes.get(inode)
        try:
            # A listed node computes them from its stored object (tree.ListedValuesDir).
            return (node.xattrs if node is not None else None) or {}
        except Exception:
            log.exception("extended attributes of inode %d; answering none", inode)
            return {}

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- everything that would change something: EROFS ---------------------------------------

    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: Ctx,
    ) -> pyfuse3.EntryAttributes:
        raise _refused("setattr")

    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: Ctx
    ) -> pyfuse3.EntryAttributes:
        raise _refused("mknod")

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: Ctx
    ) -> pyfuse3.EntryAttributes:
        raise _refused("mkdir")

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: Ctx) -> None:
        raise _refused("unlink")

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: Ctx) -> None:
        raise _refused("rmdir")

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: Ctx
    ) -> pyfuse3.EntryAttributes:
        raise _refused("symlink")

    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: Ctx,
    ) -> None:
        raise _refused("rename")

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: Ctx
    ) -> pyfuse3.EntryAttributes:
        raise _refused("link")

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        raise _refused("write")

    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: Ctx
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _refused("create")

    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: Ctx) -> None:
        raise _refused("setxattr")

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: Ctx) -> None:
        raise _refused("removexattr")


async def invalidate(entries: list[tuple[int, str]], inodes: list[int]) -> None:
    """Make the kernel forget directory entries and inodes, so that it asks us again.

    Entries go through pyfuse3's queue (`invalidate_entry_async`): invalidating synchronously
    from the trio thread can deadlock when the kernel needs an answer from us to do it.
    Inodes are invalidated in a worker thread for the same reason.
    """
    for parent, name in entries:
        pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
    for inode in inodes:
        # OSError: the kernel does not know this inode (any more): nothing to forget.
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)


def _refused(op: str) -> pyfuse3.FUSEError:
    log.debug("%s refused: read-only", op)
    return pyfuse3.FUSEError(errno.EROFS)


__all__ = ["GcfsOperations"]
