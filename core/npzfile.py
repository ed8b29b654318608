"""NumPy ``.npz`` archives read lazily and written by streaming.

Reading: a member stored uncompressed (``np.savez``) is memory-mapped, so an
archive of 50,000 images (or 21 GB of latents) is paged in on demand; a
compressed member is read into memory. Arrays of Python objects are refused:
reading never unpickles.

Writing: `NpzWriter` appends rows to each member of an uncompressed archive
(ZIP64), one block at a time, so writing ``N`` rows needs the memory of one
block, not of ``N``. The result is what ``np.savez(path, arr_0=..., arr_1=...)``
writes, read by ``np.load``, the ADM evaluator, torch-fidelity and clean-fid.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from registry import ConfigError

def memmap_member(path: Path, info: zipfile.ZipInfo) -> np.memmap | None:
    """The member as a read-only memory map when it is stored uncompressed in a format we can place; else None."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        shape, fortran, dtype = readers[version](fh)
        offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _starts_like_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def read_npz(path: Path, keys: list[str], optional: set[str], mmap: bool, where: tuple[str, ...], layout: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of the archive at `path` (those in `optional` may be absent).

    Raises:
        ConfigError: (at key path `where`) the file is missing, not a .npz archive, lacks a key,
            or holds Python objects.
    """
    if not path.is_file():
        raise ConfigError(f"no file {str(path)!r}: expected {layout}", where)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        if _starts_like_zip(path):
            raise ConfigError(f"{str(path)!r} is truncated: it starts like a .npz archive but its end (the zip "
                              f"directory) is missing after {path.stat().st_size} bytes; an interrupted copy or "
                              f"write? Copy or regenerate it", where) from None
        raise ConfigError(f"{str(path)!r} is not a .npz archive ({exc}): expected {layout}", where) from None
    out: dict[str, np.ndarray] = {}
    with zf:
        members = {name[:-4]: info for info in zf.infolist() if (name := info.filename).endswith(".npy")}
        for key in keys:
            info = members.get(key)
            if info is None:
                if key in optional:
                    continue
                raise ConfigError(f"{str(path)!r} has no array {key!r} (it holds: {', '.join(sorted(members)) or 'none'}); "
                                  f"expected {layout}", where)
            if info.header_offset + info.compress_size > path.stat().st_size:
                raise ConfigError(f"array {key!r} of {str(path)!r} is truncated: the archive ends before its data "
                                  f"does; copy or regenerate the file", where)
            try:
                array = memmap_member(path, info) if mmap else None
                if array is None:
                    with zf.open(info) as fh:
                        array = np.lib.format.read_array(fh, allow_pickle=False)
            except ValueError as exc:
                raise ConfigError(f"array {key!r} of {str(path)!r} cannot be read without unpickling ({exc}); "
                                  f"expected plain numeric arrays", where) from None
            except (OSError, EOFError, zipfile.BadZipFile, struct.error) as exc:
                raise ConfigError(f"array {key!r} of {str(path)!r} is corrupt ({exc})", where) from None
            out[key] = array
    return out


class NpzWriter:
    """Stream rows into the members of an uncompressed ``.npz`` archive.

    Args:
        path: the archive to write.
        members: ``{name: (dtype, row shape, total rows)}``; every member's shape is ``(rows, *row shape)``.

    ``write(name, rows)`` appends ``rows (B, *row shape)`` to member `name`; members are written one after the
    other, in the order given (a zip archive holds one open member at a time). ``close()`` checks that every
    member got exactly its rows.
    """

    def __init__(self, path: str | Path, members: dict[str, tuple[np.dtype | str, Sequence[int], int]]):
        self.path = Path(path)
        self.members = {k: (np.dtype(d), tuple(int(s) for s in shape), int(n)) for k, (d, shape, n) in members.items()}
        self.order = list(self.members)
        self.zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.current: str | None = None
        self.fh: IO[bytes] | None = None
        self.written: dict[str, int] = {k: 0 for k in self.members}

    def _open(self, name: str) -> None:
        if self.current == name:
            return
        if self.fh is not None:
            self.fh.close()
        done = self.order.index(self.current) if self.current is not None else -1
        if self.order.index(name) <= done:
            raise ValueError(f"member {name!r} was already closed: write members in the order {self.order}")
        dtype, shape, n = self.members[name]
        self.current = name
        self.fh = self.zip.open(f"{name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *shape)}
        np.lib.format.write_array_header_2_0(self.fh, header)

    def write(self, name: str, rows: np.ndarray) -> None:
        dtype, shape, n = self.members[name]
        rows = np.ascontiguousarray(rows, dtype=dtype)
        if tuple(rows.shape[1:]) != shape or self.written[name] + len(rows) > n:
            raise ValueError(f"member {name!r}: rows of shape {rows.shape} do not fit ({n}, {shape}) after "
                             f"{self.written[name]} rows")
        self._open(name)
        assert self.fh is not None
        self.fh.write(rows.tobytes())
        self.written[name] += len(rows)

    def close(self) -> None:
        start = self.order.index(self.current) + 1 if self.current is not None else 0
        for name in self.order[start:]:  # members never written still get their header
            self._open(name)
        if self.fh is not None:
            self.fh.close()
        self.zip.close()
        short = {k: (self.written[k], n) for k, (_, _, n) in self.members.items() if self.written[k] != n}
        if short:
            raise ValueError(f"{self.path}: members were not filled (written, expected): {short}")

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            if self.fh is not None:
                self.fh.close()
            self.zip.close()
