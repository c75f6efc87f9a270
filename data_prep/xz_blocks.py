"""The blocks of an .xz file, read from its index, so that workers can decompress them in parallel.

An .xz file is one or more streams; each stream is a 12-byte header, blocks, an index (the
compressed and uncompressed size of every block) and a 12-byte footer.  `xz -T0` (and
`xz --block-size`) writes one stream of many blocks, concatenating single-block files
(`cat a.xz b.xz`) gives many streams of one block: either way every block can be decompressed on
its own by feeding its stream's header and the block to an LZMADecompressor.  Plain `xz` (one
thread, xz < 5.4's default) writes a single block: nothing to parallelize, `blocks()` says None.

Only what the format spec (https://tukaani.org/xz/xz-file-format.txt) needs for this is parsed;
any surprise (a truncated file, a corrupt footer, unknown flags) gives None, and the caller reads
the file as one stream, which reports the damage.
"""
import dataclasses
import lzma
import os
import struct
import zlib

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = FOOTER_SIZE = 12


@dataclasses.dataclass(frozen=True)
class Block:
    stream_header: bytes  # the 12 bytes a decompressor must see before the block
    offset: int  # where the block starts in the file
    compressed_size: int  # the block's size in the file, padding and check included
    uncompressed_offset: int  # where its text starts in the file's uncompressed bytes
    uncompressed_size: int


def _varint(buf, pos):
    """A multibyte integer of the format (7 bits per byte, least significant first)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _stream_blocks(f, footer_end):
    """(stream start, [(unpadded, uncompressed), ...]) of the stream whose footer ends at footer_end."""
    f.seek(footer_end - FOOTER_SIZE)
    footer = f.read(FOOTER_SIZE)
    if len(footer) != FOOTER_SIZE or footer[10:] != FOOTER_MAGIC:
        raise ValueError("no stream footer")
    if zlib.crc32(footer[4:10]) != struct.unpack("<I", footer[:4])[0]:
        raise ValueError("footer CRC mismatch")
    index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
    index_start = footer_end - FOOTER_SIZE - index_size
    f.seek(index_start)
    index = f.read(index_size)
    if len(index) != index_size or index[0] != 0 or zlib.crc32(index[:-4]) != struct.unpack("<I", index[-4:])[0]:
        raise ValueError("bad index")
    count, pos = _varint(index, 1)
    records = []
    for _ in range(count):
        unpadded, pos = _varint(index, pos)
        uncompressed, pos = _varint(index, pos)
        records.append((unpadded, uncompressed))
    blocks_size = sum((u + 3) & ~3 for u, _ in records)
    stream_start = index_start - blocks_size - HEADER_SIZE
    if stream_start < 0:
        raise ValueError("index larger than the file")
    f.seek(stream_start)
    header = f.read(HEADER_SIZE)
    if header[:6] != HEADER_MAGIC or header[6:8] != footer[8:10]:
        raise ValueError("no stream header where the index says")
    return stream_start, header, records


def read_blocks(path):
    """Every block of the file, in order, or None when the index cannot be read (see module doc)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            streams = []
            while end > 0:
                f.seek(end - 4)
                if f.read(4) == b"\0\0\0\0":  # stream padding between streams
                    end -= 4
                    continue
                start, header, records = _stream_blocks(f, end)
                streams.append((start, header, records))
                end = start
    except (OSError, ValueError, IndexError, struct.error):
        return None
    blocks, text_offset = [], 0
    for start, header, records in reversed(streams):
        offset = start + HEADER_SIZE
        for unpadded, uncompressed in records:
            padded = (unpadded + 3) & ~3
            blocks.append(Block(header, offset, padded, text_offset, uncompressed))
            offset += padded
            text_offset += uncompressed
    return blocks


def blocks(path):
    """The blocks of an .xz file worth decompressing in parallel (two or more), else None."""
    found = read_blocks(path) if path.endswith(".xz") else None
    return found if found and len(found) > 1 else None


class BlockReader:
    """Decompresses one block, all at once (read_all) or a piece at a time (read)."""

    def __init__(self, f, block):
        f.seek(block.offset)
        self._compressed = f.read(block.compressed_size)
        if len(self._compressed) != block.compressed_size:
            raise EOFError(f"block at byte {block.offset} is cut short")
        self._decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self._pending = block.stream_header + self._compressed
        self.remaining = block.uncompressed_size

    def read(self, size):
        """Up to size more bytes of the block's text (b"" at its end); LZMAError when corrupt."""
        if self.remaining <= 0:
            return b""
        data = self._decoder.decompress(self._pending, max_length=min(size, self.remaining))
        self._pending = b""
        self.remaining -= len(data)
        if not data and self.remaining > 0:
            raise lzma.LZMAError("block ends before its size in the index")
        return data

    def read_all(self):
        parts = []
        while True:
            data = self.read(1 << 24)
            if not data:
                return b"".join(parts)
            parts.append(data)
