"""Image collections too large to hold at once, read block by block: ``.npy`` shards, image
folders and Parquet files.

A batch-scoring run (:mod:`anomaly.engines`) plans its input once (:func:`plan_blocks`): a list
of :class:`Block` descriptors, small and JSON-able, that any process can read on its own
(:func:`read_block`). A block's index and source depend only on the input's files, so a
restarted run finds the same blocks and can skip those whose output is already written. Ray
Data's own readers do not expose that identity, which is why the blocks are ours and only the
execution is Ray's.

Inputs:

- a ``.npy`` file, or a folder of ``.npy`` shards, each an array ``(N, H, W[, C])`` or
  flattened rows ``(N, H*W*C)`` (read memory-mapped, ``block_rows`` images per block). Ids are
  the row index (one file) or ``FILE:ROW`` (a folder).
- a Parquet file, or a folder of them, with an image column (PNG/JPEG bytes, an image struct
  with a ``bytes`` field as Hugging Face and Ray write it, or pixel arrays as lists) and an id
  column (``FILE:ROW`` when there is none). A block is a row group, the unit Parquet reads.
- a folder of image files (sub-folders included); ids are the paths relative to the folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from anomaly.config import BLOCK_ROWS
from anomaly.data.images import (
    IMAGE_SUFFIXES,
    _check_npy_header,
    decode_image_bytes,
    list_files,
    stack_images,
    to_unit_float,
)
from anomaly.errors import DataError, expected

PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_COLUMN, ID_COLUMN = "image", "id"


@dataclass(frozen=True)
class Block:
    """One unit of work: rows ``start:stop`` of one source file (or ``files`` of a folder).

    Attributes:
        index: position in the plan, which names the block's output file.
        kind: ``npy``, ``parquet`` or ``folder``.
        path: the ``.npy``/Parquet file, or the image folder.
        start, stop: rows of the file (Parquet: of the row group ``row_group``).
        id_prefix: ``FILE:`` when ids are built from row numbers of one of several files.
        files: a folder block's image files, relative to ``path``.
    """

    index: int
    kind: str
    path: str
    start: int
    stop: int
    row_group: int = -1
    row_offset: int = 0
    id_prefix: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Block:
        d = json.loads(text)
        d["files"] = tuple(d.get("files", ()))
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """Every block of an input, in order, and a fingerprint of the files they come from."""

    kind: str
    source: str
    blocks: list[Block]
    fingerprint: str
    image_column: str = IMAGE_COLUMN
    id_column: str = ID_COLUMN

    @property
    def n_rows(self) -> int:
        return sum(b.n_rows for b in self.blocks)


def _fingerprint(files: list[Path], extra: object = None) -> str:
    """Names and sizes of the input files: a restarted run must see the same input."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for f in files:
        h.update(f"{f}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def _npy_rows(path: Path) -> int:
    with open(path, "rb") as fp:
        _check_npy_header(fp, path.stat().st_size, str(path))
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim not in (2, 3, 4):
        raise expected("an array of images (N, H, W[, C]) or flattened rows (N, H*W*C)",
                       f"shape {arr.shape} in {path}", cls=DataError)
    return int(arr.shape[0])


def _parquet_groups(path: Path, image_column: str) -> list[int]:
    """Rows per row group, after checking that the image column is there."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own error types (ArrowInvalid, OSError)
        raise expected("a readable Parquet file", f"{path} ({type(exc).__name__}: "
                       f"{str(exc)[:120]})", cls=DataError) from None
    names = meta.schema_arrow.names
    if image_column not in names:
        raise expected(f"a Parquet file with an image column {image_column!r} (PNG/JPEG bytes "
                       "or pixel arrays)", f"columns {names[:20]} in {path}",
                       hint="Name the column with --image-column.", cls=DataError)
    return [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]


def plan_blocks(path: str | Path, *, block_rows: int = BLOCK_ROWS,
                image_column: str = IMAGE_COLUMN, id_column: str = ID_COLUMN) -> Plan:
    """Split an input (see the module docstring) into blocks; reads only headers and
    metadata."""
    path = Path(path).resolve()
    if block_rows < 1:
        raise expected("block_rows >= 1", block_rows, cls=DataError)
    if not path.exists():
        raise expected("an existing .npy/Parquet file or a folder of shards or images",
                       f"{path} (not found)", cls=DataError)
    if path.is_file():
        files, prefix = [path], False
        suffix = path.suffix.lower()
        kind = ("npy" if suffix == ".npy" else "parquet" if suffix in PARQUET_SUFFIXES
                else None)
        if kind is None:
            raise expected("a .npy or .parquet file, or a folder of them or of images",
                           f"{path} (suffix {suffix!r})", hint="A single .npz, .csv or image "
                           "file is scored by the plain 'anomaly score ... --output FILE.csv'.",
                           cls=DataError)
    else:
        prefix = True
        by_kind = {k: list_files(path, s) for k, s in
                   (("npy", {".npy"}), ("parquet", set(PARQUET_SUFFIXES)),
                    ("folder", IMAGE_SUFFIXES))}
        found = [k for k, v in by_kind.items() if v]
        if len(found) != 1:
            raise expected("a folder holding one kind of input: .npy shards, Parquet files "
                           "or image files", f"{path} with "
                           + (", ".join(f"{len(by_kind[k])} {k}" for k in found) or "none"),
                           cls=DataError)
        kind, files = found[0], by_kind[found[0]]
    blocks: list[Block] = []

    def add(**kw) -> None:
        blocks.append(Block(index=len(blocks), **kw))

    if kind == "folder":
        rel = [str(f.relative_to(path)) for f in files]
        for s in range(0, len(rel), block_rows):
            chunk = tuple(rel[s : s + block_rows])
            add(kind=kind, path=str(path), start=s, stop=s + len(chunk), files=chunk)
    for f in files if kind != "folder" else ():
        tag = f"{f.relative_to(path)}:" if prefix else ""
        if kind == "npy":
            n = _npy_rows(f)
            for s in range(0, n, block_rows):
                add(kind=kind, path=str(f), start=s, stop=min(n, s + block_rows), id_prefix=tag)
        else:
            offset = 0
            for g, n in enumerate(_parquet_groups(f, image_column)):
                if n:
                    add(kind=kind, path=str(f), start=0, stop=n, row_group=g,
                        row_offset=offset, id_prefix=tag or f"{f.name}:")
                offset += n
    if not blocks:
        raise expected(f"at least one image in {path}", "none", cls=DataError)
    return Plan(kind, str(path), blocks,
                _fingerprint(files, [kind, block_rows, image_column, id_column]),
                image_column, id_column)


def _pixel_rows(column, where: str) -> np.ndarray:
    """A Parquet list column of pixels (nested lists flattened) -> ``(N, values)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(column)
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        if column.null_count:
            raise expected("an image in every row", f"{column.null_count} empty rows in {where}",
                           cls=DataError)
        lengths = pc.list_value_length(column)
        if n and pc.min(lengths).as_py() != pc.max(lengths).as_py():
            raise expected("pixel arrays of one length in every row", f"lengths "
                           f"{pc.min(lengths).as_py()}..{pc.max(lengths).as_py()} in {where}",
                           cls=DataError)
        column = column.flatten()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise expected("pixel values as numbers", f"type {column.type} in {where}",
                       cls=DataError)
    return column.to_numpy(zero_copy_only=False).reshape(n, -1)


def _decode_all(blobs: list, ids: list[str], shape, where: str, skip_bad: bool):
    kept, images, skipped = [], [], []
    for blob, name in zip(blobs, ids, strict=True):
        try:
            if blob is None:
                raise expected("image bytes in every row", "an empty value", cls=DataError)
            images.append(decode_image_bytes(blob, name=f"{where} row {name}",
                                             channels=shape[2]))
            kept.append(name)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((name, str(exc)))
    x = stack_images(images, kept, shape=shape) if images else np.zeros((0, *shape), np.float32)
    return kept, x, skipped


def read_npy_rows(path: str | Path, rows: slice | np.ndarray,
                  shape: tuple[int, int, int] | None) -> np.ndarray:
    """Rows of a ``.npy`` file, memory-mapped so that only they are read, validated and brought
    to ``shape`` ``(H, W, C)`` (``None``: their own): ``(n, H, W[, C])`` float32 in [0, 1], in
    the order of ``rows`` (a slice or positions ``(n,)``)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)[rows]
    return to_unit_float(np.asarray(arr), shape=shape, what=f"the array in {path}")


def read_block(block: Block, shape: tuple[int, int, int], *, image_column: str = IMAGE_COLUMN,
               id_column: str = ID_COLUMN, skip_bad: bool = False
               ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """The images of one block, validated and brought to ``shape`` ``(H, W, C)``.

    Returns:
        ``(ids, images, skipped)``: ids ``(n,)``, images ``(n, H, W[, C])`` float32 in [0, 1]
        and, with ``skip_bad``, ``(id, reason)`` of the undecodable ones (else they raise).
    """
    where = block.path
    if block.kind == "npy":
        ids = [f"{block.id_prefix}{i}" for i in range(block.start, block.stop)]
        return ids, read_npy_rows(block.path, slice(block.start, block.stop), shape), []
    if block.kind == "folder":
        root = Path(block.path)
        blobs = []
        for rel in block.files:
            try:
                blobs.append((root / rel).read_bytes())
            except OSError as exc:
                if not skip_bad:
                    raise expected("a readable image file", f"{root / rel} ({exc.strerror})",
                                   cls=DataError) from None
                blobs.append(None)
        return _decode_all(blobs, list(block.files), shape, where, skip_bad)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(block.path)
    columns = [c for c in (image_column, id_column) if c in pf.schema_arrow.names]
    table = pf.read_row_group(block.row_group, columns=columns)
    if id_column in columns:
        ids = [str(v) for v in table.column(id_column).to_pylist()]
    else:
        first = block.row_offset
        ids = [f"{block.id_prefix}{first + i}" for i in range(table.num_rows)]
    col = table.column(image_column).combine_chunks()
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = col.field("bytes")
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return _decode_all(col.to_pylist(), ids, shape, where, skip_bad)
    pixels = _pixel_rows(col, f"column {image_column!r} of {where}")
    return ids, to_unit_float(pixels, shape=shape, what=f"column {image_column!r} of {where}"), []
