"""The index file format of the block store (blockstore.py): self-checking 48-byte records,
and a parser that finds them among torn or clobbered bytes.

A record (big-endian, 48 bytes):

    magic "GCI1" | kind (1 block, 2 size only, 3 dropped) | 3 pad | block size (u32)
    | block index (u64) | data length (u32) | crc32 of the data (u32) | file size (u64)
    | first 8 bytes of the key's digest | crc32 of the 44 bytes before (u32)

Records are only ever appended, whole, one write per batch. A reader parses from a record
boundary (or from where its last parse stopped): a record that fails its crc, or belongs to
another file or block size, is skipped; after bytes that are not a record, the next record is
the next magic whose 48 bytes pass their crc, wherever it lies (a crash tears an append; two NFS
clients appending at once may overwrite each other's records). A short tail is a record still
being appended: it is left for the next parse, not counted as damage.
"""

from __future__ import annotations

import struct
import zlib

_MAGIC = b"GCI1"
_RECORD = struct.Struct(">4sB3xIQIIQ8s")
_RECORD_CRC = struct.Struct(">I")
RECORD_SIZE = _RECORD.size + _RECORD_CRC.size  # 48 bytes: 0.005 % of a 1 MiB block
KIND_BLOCK, KIND_SIZE, KIND_DROPPED = 1, 2, 3

Fields = tuple[int, int, int, int, int, int, bytes]


def record(kind: int, bs: int, index: int, length: int, crc: int, size: int, digest: str) -> bytes:
    """One record, its own crc included (`digest`: the key's sha256 in hex)."""
    body = _RECORD.pack(_MAGIC, kind, bs, index, length, crc, size, bytes.fromhex(digest[:16]))
    return body + _RECORD_CRC.pack(zlib.crc32(body))


def parse(raw: bytes) -> Fields | None:
    """(kind, block size, index, length, crc, size, digest prefix), or None if damaged."""
    body = raw[: _RECORD.size]
    (check,) = _RECORD_CRC.unpack_from(raw, _RECORD.size)
    if zlib.crc32(body) != check:
        return None
    magic, kind, bs, index, length, crc, size, prefix = _RECORD.unpack(body)
    if magic != _MAGIC or kind not in (KIND_BLOCK, KIND_SIZE, KIND_DROPPED):
        return None
    return kind, bs, index, length, crc, size, prefix


def parse_records(raw: bytes, prefix: bytes, block_size: int) -> tuple[list[Fields], int, int]:
    """The records of an index's bytes (read from a record boundary, or from where the last
    parse stopped): the records that belong to this file and block size, how many bytes were
    consumed (what follows may be a record still being appended) and how many damaged
    stretches were skipped. After bytes that are not a record (torn by a crash, clobbered by
    another client's append), the next record is the next magic whose 48 bytes pass their
    crc, wherever it lies."""
    out: list[Fields] = []
    pos = damaged = 0
    end = len(raw)
    while end - pos >= RECORD_SIZE:
        fields = parse(raw[pos : pos + RECORD_SIZE])
        if fields is not None:
            if fields[6] == prefix and fields[1] == block_size:
                out.append(fields)
            else:
                damaged += 1  # a record of another file or block size: not ours to use
            pos += RECORD_SIZE
            continue
        damaged += 1
        found = raw.find(_MAGIC, pos + 1)
        while (
            found >= 0
            and end - found >= RECORD_SIZE
            and parse(raw[found : found + RECORD_SIZE]) is None
        ):
            found = raw.find(_MAGIC, found + 1)
        if found < 0:
            # No record starts here; keep the last bytes, which may be the start of a magic.
            pos = end - (len(_MAGIC) - 1)
            break
        pos = found
    return out, pos, damaged


__all__ = [
    "KIND_BLOCK",
    "KIND_DROPPED",
    "KIND_SIZE",
    "RECORD_SIZE",
    "Fields",
    "parse",
    "parse_records",
    "record",
]
