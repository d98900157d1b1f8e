"""What is still readable in an MCAP file cut off (power loss) or with garbage after it.

MCAP's data section is a sequence of self-contained records (opcode, length, body); the
summary and footer at its end only index them. A damaged end is therefore cut at the last
complete record of the data section, and a new, index-less end (DataEnd, Footer, magic) is
written after it: a reader then finds every complete chunk by scanning, as
`ros2 bag reindex` users expect. Nothing is decoded or decompressed here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x89MCAP0\r\n"
_HEADER, _FOOTER, _CHUNK, _DATA_END = 0x01, 0x02, 0x06, 0x0F
_RECORD_HEAD = struct.Struct("<BQ")  # opcode, body length


@dataclass(frozen=True)
class Salvage:
    path: Path  # the repaired copy
    kept_bytes: int  # of the data section, copied as they were
    dropped_bytes: int  # after the last complete record (cut chunk, old summary, garbage)
    chunks: int  # complete chunks kept (the records of a cut, uncompressed one are kept too)


def salvage_mcap(source: Path, target: Path) -> Salvage | None:
    """Writes to `target` the complete records of `source`'s data section with a fresh
    end; returns what was kept, or None when `source` does not start as an MCAP file."""
    data = Path(source).read_bytes()
    if not data.startswith(MAGIC):
        return None
    offset, chunks = len(MAGIC), 0
    tail = b""  # complete records of an uncompressed chunk that was cut off
    while offset + _RECORD_HEAD.size <= len(data):
        opcode, length = _RECORD_HEAD.unpack_from(data, offset)
        end = offset + _RECORD_HEAD.size + length
        if opcode in (_DATA_END, _FOOTER) or (opcode == _HEADER and offset != len(MAGIC)):
            break  # the (possibly damaged) summary section begins
        if end > len(data):
            if opcode == _CHUNK:
                tail = _complete_records_of_cut_chunk(data[offset + _RECORD_HEAD.size:])
            break
        chunks += opcode == _CHUNK
        offset = end
    if offset == len(MAGIC) and not tail:
        return None
    data_end = _RECORD_HEAD.pack(_DATA_END, 4) + struct.pack("<I", 0)  # data section CRC: not given
    footer = _RECORD_HEAD.pack(_FOOTER, 20) + struct.pack("<QQI", 0, 0, 0)  # no summary section
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:offset] + tail + data_end + footer + MAGIC)
    return Salvage(target, offset + len(tail), len(data) - offset - len(tail), chunks)


def _complete_records_of_cut_chunk(body: bytes) -> bytes:
    """The complete schema, channel and message records inside a chunk whose end is
    missing, when it is uncompressed (a compressed one cannot be cut: it is dropped)."""
    fixed = struct.calcsize("<QQQI")  # message start and end time, uncompressed size and CRC
    if len(body) < fixed + 4:
        return b""
    (name_length,) = struct.unpack_from("<I", body, fixed)
    start = fixed + 4 + name_length + 8  # after the compression name and the records' length
    if body[fixed + 4:fixed + 4 + name_length] != b"" or start > len(body):
        return b""
    records, offset = body[start:], 0
    while offset + _RECORD_HEAD.size <= len(records):
        _, length = _RECORD_HEAD.unpack_from(records, offset)
        if offset + _RECORD_HEAD.size + length > len(records):
            break
        offset += _RECORD_HEAD.size + length
    return records[:offset]
