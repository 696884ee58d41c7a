"""Rebuilds data/austen/*.txt from Debian's ``r-cran-janeaustenr`` package (no R needed).

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb pkg
    python data/extract_austen.py pkg/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb data/austen

An R lazy-load database (``Rdata.rdb``) is a run of blocks, each a 4-byte big-endian length
followed by a zlib stream of one object in R's XDR serialization. Each novel is a character
vector (one element per printed line); its elements are CHARSXP records: a 4-byte flags word
whose low byte is 9, a 4-byte length, then that many bytes of UTF-8.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

# Object order in the package's lazy-load DB, with the file name we give each novel.
NOVELS = {
    "Sense and Sensibility": "sense_and_sensibility.txt",
    "Pride and Prejudice": "pride_and_prejudice.txt",
    "Mansfield Park": "mansfield_park.txt",
    "Emma": "emma.txt",
    "Northanger Abbey": "northanger_abbey.txt",
    "Persuasion": "persuasion.txt",
}


def blocks(raw: bytes):
    """Yields the decompressed payload of every block of a lazy-load DB."""
    pos = 0
    while pos + 4 < len(raw):
        d = zlib.decompressobj()
        payload = d.decompress(raw[pos + 4 :])
        yield payload
        pos = len(raw) - len(d.unused_data)


def strings(payload: bytes) -> list[str]:
    """Every CHARSXP string of one serialized character vector, in order."""
    if payload[:2] != b"X\n":
        return []
    # header: "X\n", version, writer version, min reader version (+ native encoding for v3)
    version = struct.unpack(">i", payload[2:6])[0]
    pos = 14
    if version == 3:
        (n_enc,) = struct.unpack(">i", payload[pos : pos + 4])
        pos += 4 + n_enc
    flags, length = struct.unpack(">ii", payload[pos : pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        return []
    pos += 8
    out = []
    for _ in range(length):
        flags, n = struct.unpack(">ii", payload[pos : pos + 8])
        pos += 8
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(payload[pos : pos + n].decode("utf-8"))
        pos += n
    return out


def main(rdb: str, out_dir: str) -> None:
    raw = Path(rdb).read_bytes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for payload in blocks(raw):
        lines = strings(payload)
        if len(lines) < 1000:
            continue
        head = "\n".join(lines[:20]).upper()
        for title, name in NOVELS.items():
            if title.upper() in head:
                (out / name).write_text("\n".join(lines).strip() + "\n", encoding="utf-8")
                print(f"{name}: {len(lines)} lines")
                break


if __name__ == "__main__":
    main(*sys.argv[1:3])
