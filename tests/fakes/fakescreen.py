"""The fakes' guest screen: a 720x400 PNG (VGA text mode's size) with a few lines of light
"text" on black, written with the standard library only."""
import struct
import zlib

WIDTH, HEIGHT = 720, 400


def png(width=WIDTH, height=HEIGHT):
    rows = []
    for y in range(height):
        line = bytearray(b"\x00")  # filter: none
        lit = (y // 16) < 5 and (y % 16) < 12
        for x in range(width):
            on = lit and (x // 9) % 3 != 2 and x < 9 * (40 + 7 * (y // 16))
            line += b"\xaa\xaa\xaa" if on else b"\x00\x00\x00"
        rows.append(bytes(line))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))
