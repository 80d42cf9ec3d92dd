"""Training images that need not fit in memory: on disk, read block by block when asked.

``anomaly fit`` reads its training images into one array when they fit in memory; otherwise
(``--stream auto``, :func:`choose_stream`, or ``always``) it opens them as :class:`DiskImages`.
A :class:`DiskImages` indexes like that array (``x[positions]``, ``x[a:b]``, ``len(x)``,
``x.shape``), so the test split, the normal classes, ``--train-limit`` and the validation
hold-out are chosen from the file list by the very code that splits arrays
(:func:`~anomaly.data.splits.split_one_class`), but it holds only the file list (or the
``.npy`` shards' row counts) and reads images when asked: a batch of the tf.data pipeline
(:func:`anomaly.training.train`), a block of codes or scores after training
(:meth:`DiskImages.blocks`).

Opening scans every image once, keeping only its size and whether it is colour, so that a bad
file or images of several sizes fail before training, with the in-memory path's errors, and so
that each image read later is the one that path would hold: it is read by
:func:`~anomaly.data.shards.read_block` at the shape the in-memory reader stacks it at, then
finished as that reader finishes the whole set (colour whose channels are all equal kept as
grey; ``--grayscale`` luma).

Sources: a folder of image files (one level of sub-folders names the classes), the
``train/good`` images of an MVTec AD folder, a ``.npy`` file or a folder of ``.npy`` shards
(memory-mapped; only the rows asked for are read).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from anomaly.config import BLOCK_ROWS, FIELDS, STREAM_MEMORY_FRACTION
from anomaly.data.images import (
    _COLOUR_MODES,
    IMAGE_SUFFIXES,
    ImageSet,
    all_skipped,
    check_one_size,
    decode_files,
    folder_labels,
    list_files,
    no_images_in,
    to_unit_float,
)
from anomaly.data.layouts import GOOD, check_trainable, image_files, is_mvtec
from anomaly.data.shards import Block, plan_blocks, read_block, read_npy_rows
from anomaly.errors import ConfigError, DataError, expected

STREAM_MODES: tuple[str, ...] = FIELDS["stream"].metadata["choices"]
#: Decoded bytes of one block read after training (kNN codes, hold-out and training scores):
#: the memory those steps add. 1,024 images when they fit, the chunk ``Detector.encode`` runs,
#: so that codes are computed in the same chunks as from an array.
READ_BLOCK_BYTES = 256 << 20
MAX_BLOCK_ROWS = 1024
#: Headers read to estimate a folder's decoded size (evenly spaced files, the largest wins).
_SAMPLED_HEADERS = 16


class _Source:
    """Where the images are and how to read image ``i`` (its position in the whole source).

    ``read_shape`` ``(H, W, C)`` is the shape the in-memory reader stacks the images at;
    ``finish`` what it then does to the whole set: ``""``, ``"collapse"`` (colour whose
    channels are all equal becomes grey: channel 0) or ``"luma"`` (colour to grey, as
    :func:`~anomaly.data.images.to_unit_float` converts it).
    """

    def __init__(self, kind: str, root: Path, files: tuple[str, ...],
                 read_shape: tuple[int, int, int], finish: str,
                 starts: np.ndarray | None = None):
        self.kind, self.root, self.files = kind, root, files
        self.read_shape, self.finish = read_shape, finish
        self.starts = starts  # npy: the first position of each shard, then the total
        self.error: Exception | None = None  # the last read's, for an error inside tf.data

    def __len__(self) -> int:
        return len(self.files) if self.kind == "folder" else int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w, c = self.read_shape
        return (h, w, 1) if self.finish else (h, w, c)

    def read(self, items: np.ndarray) -> np.ndarray:
        if self.kind == "folder":
            names = tuple(self.files[i] for i in items)
            block = Block(index=0, kind="folder", path=str(self.root), start=0, stop=len(names),
                          files=names)
            x = read_block(block, self.read_shape)[1]
        else:
            shard = np.searchsorted(self.starts, items, side="right") - 1
            x = None
            for s in np.unique(shard):
                at = np.flatnonzero(shard == s)
                part = read_npy_rows(self.files[s], items[at] - self.starts[s], self.read_shape)
                if x is None:
                    x = np.empty((len(items), *part.shape[1:]), np.float32)
                x[at] = part
        if self.finish == "collapse":
            return np.ascontiguousarray(x[..., 0])
        if self.finish == "luma":
            return to_unit_float(x, shape=self.shape, what=str(self.root))
        return x


class DiskImages:
    """Images on disk that index like the array ``(N, H, W[, C])`` float32 in [0, 1] that
    reading them into memory would give, and read only the images asked for.

    ``x[positions]`` (an index array, a boolean mask or a slice) is another view of the same
    files; :meth:`read`, :meth:`blocks` and :meth:`load` return arrays. An integer position
    is refused: a loop over single images would read the files one at a time.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, source: _Source, index: np.ndarray | None = None):
        self._source = source
        self.index = (np.arange(len(source), dtype=np.int64) if index is None
                      else np.asarray(index, np.int64))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return self._source.shape

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, H, W)`` (grey) or ``(N, H, W, C)``, as the array's."""
        h, w, c = self.image_shape
        return (len(self), h, w) if c == 1 else (len(self), h, w, c)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the images decoded: what :meth:`load` would allocate."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def error(self) -> Exception | None:
        """The error of the last failed read (a tf.data pipeline reports its own instead)."""
        return self._source.error

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"DiskImages({self._source.root}, shape={self.shape})"

    def __getitem__(self, key) -> DiskImages:
        if isinstance(key, int | np.integer):
            raise TypeError("DiskImages take positions (an index array or a slice): x[[i]] "
                            "reads image i")
        return DiskImages(self._source, self.index[key])

    def read(self, positions) -> np.ndarray:
        """Images at ``positions`` ``(n,)`` of this view, in that order: ``(n, H, W[, C])``."""
        items = self.index[np.asarray(positions, np.int64)]
        if len(items) == 0:
            return np.zeros((0, *self.shape[1:]), np.float32)
        try:
            return self._source.read(items)
        except (DataError, OSError) as exc:
            self._source.error = exc
            raise

    def block_rows(self) -> int:
        """Images per block of :meth:`blocks`: :data:`MAX_BLOCK_ROWS`, fewer for large
        images (:data:`READ_BLOCK_BYTES` at most)."""
        per_image = math.prod(self.image_shape) * self.dtype.itemsize
        return max(1, min(MAX_BLOCK_ROWS, READ_BLOCK_BYTES // per_image))

    def blocks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """The images in order, ``rows`` (default :meth:`block_rows`) at a time."""
        rows = rows or self.block_rows()
        for start in range(0, len(self), rows):
            yield self.read(np.arange(start, min(len(self), start + rows)))

    def load(self) -> np.ndarray:
        """All the images in memory: ``(N, H, W[, C])``."""
        out = np.empty(self.shape, np.float32)
        at = 0
        for block in self.blocks():
            out[at : at + len(block)] = block
            at += len(block)
        return out


def blockwise(fn, x, *, rows: int | None = None) -> np.ndarray:
    """``fn(x)`` for an array; for :class:`DiskImages`, ``fn`` of each block, concatenated.
    ``fn`` maps images ``(n, H, W[, C])`` to ``(n, ...)``; ``rows``: images per block."""
    if not isinstance(x, DiskImages):
        return fn(x)
    parts = [fn(block) for block in x.blocks(rows)]
    return np.concatenate(parts) if parts else fn(x.read([]))


def _scan(root: Path, files: list[Path], channels: int | None, *, skip_bad: bool,
          skipped: list) -> tuple[list[Path], set[tuple[int, int]], bool]:
    """Decode every file once: the files kept, their sizes ``(H, W)`` and whether any is
    colour (a colour file whose pixels are all grey is grey, as when it is read)."""
    kept, sizes, colour = [], set(), False
    for p, img in decode_files(root, files, channels, skip_bad=skip_bad, skipped=skipped,
                               desc=f"Scanning {root}"):
        kept.append(p)
        sizes.add(img.shape[:2])
        colour = colour or img.ndim == 3
    return kept, sizes, colour


def _finished(sizes, colour: bool, image_size, grayscale: bool, *, grey_decode: bool = False):
    """``(read_shape, finish)`` of :class:`_Source` for a set of images: see the module
    docstring. ``grey_decode``: the in-memory reader decodes them grey for ``--grayscale``
    (the MVTec AD reader) rather than converting colour by luma after."""
    if image_size is None:
        check_one_size(sizes)
        (h, w), = sizes
        if grayscale and grey_decode:
            return (h, w, 1), ""
        return (h, w, 3 if colour else 1), ("luma" if grayscale and colour else "")
    h, w = image_size
    c = 1 if grayscale else 3
    return (h, w, c), ("collapse" if c == 3 and not colour else "")


def open_folder(path: str | Path, *, image_size: tuple[int, int] | None = None,
                grayscale: bool = False, skip_bad: bool = False) -> ImageSet:
    """The images :func:`~anomaly.data.layouts.load_folder` reads, on disk: an
    :class:`~anomaly.data.images.ImageSet` whose ``images`` are :class:`DiskImages`
    ``(N, H, W[, C])``, with the same ids, labels, skipped files and errors."""
    path = Path(path)
    files = list_files(path)
    if not files:
        raise no_images_in(path)
    skipped: list = []
    # Grey decoding suffices where colour cannot change the result.
    channels = 1 if grayscale and image_size is not None else None
    kept, sizes, colour = _scan(path, files, channels, skip_bad=skip_bad, skipped=skipped)
    if not kept:
        raise all_skipped(path, len(skipped))
    ids = [str(p.relative_to(path)) for p in kept]
    labels, class_names = folder_labels(path, kept)
    read_shape, finish = _finished(sizes, colour, image_size, grayscale)
    images = DiskImages(_Source("folder", path, tuple(ids), read_shape, finish))
    return ImageSet(images, ids, labels, class_names, skipped)


def open_mvtec_train(root: str | Path, *, image_size: tuple[int, int] | None = None,
                     grayscale: bool = False) -> DiskImages:
    """The training images (``train/good``) that :func:`~anomaly.data.layouts.load_mvtec`
    reads, on disk: ``(N, H, W[, C])``."""
    folder = Path(root) / "train" / GOOD
    files = image_files(folder)
    if not files:
        raise expected(f"image files in {folder}", "none", cls=DataError)
    kept, sizes, colour = _scan(folder, files, 1 if grayscale else None, skip_bad=False,
                                skipped=[])
    read_shape, finish = _finished(sizes, colour, image_size, grayscale, grey_decode=True)
    images = DiskImages(_Source("folder", folder, tuple(p.name for p in kept), read_shape,
                                finish))
    check_trainable(images)
    return images


def _npy_plan(path: Path):
    plan = plan_blocks(path, block_rows=BLOCK_ROWS)
    if plan.kind != "npy":
        raise expected("a .npy file or a folder of .npy shards", f"{path} ({plan.kind} files)",
                       cls=DataError)
    shards = list(dict.fromkeys(b.path for b in plan.blocks))
    counts = {s: 0 for s in shards}
    for b in plan.blocks:
        counts[b.path] = max(counts[b.path], b.stop)
    return shards, np.cumsum([0] + [counts[s] for s in shards])


def open_npy(path: str | Path, *, image_size: tuple[int, int] | None = None,
             grayscale: bool = False) -> ImageSet:
    """A ``.npy`` file, or a folder of ``.npy`` shards, of images ``(N, H, W[, C])`` or
    flattened rows, memory-mapped: an :class:`~anomaly.data.images.ImageSet` of
    :class:`DiskImages` read as :func:`~anomaly.data.layouts.load_folder` reads one ``.npy``
    file (a folder's shards must hold images of one size, unless ``image_size``; colour wins).
    Every row is validated once, block by block, before it is used."""
    from anomaly.progress import progress

    path = Path(path)
    shards, starts = _npy_plan(path)
    sizes, colour, own_colour = set(), False, False
    with progress(f"Scanning {path}", total=int(starts[-1])) as bar:
        for s, shard in enumerate(shards):
            n = int(starts[s + 1] - starts[s])
            rows = max(1, READ_BLOCK_BYTES // read_npy_rows(shard, slice(0, 1), None).nbytes)
            for at in range(0, n, rows):
                x = read_npy_rows(shard, slice(at, min(n, at + rows)), None)
                sizes.add(x.shape[1:3])
                if x.ndim == 4:
                    own_colour = True
                    colour = colour or not (np.array_equal(x[..., 0], x[..., 1])
                                            and np.array_equal(x[..., 1], x[..., 2]))
                bar.update(len(x))
    # An array keeps its own channels (a 3-channel grey array stays 3-channel) unless resized.
    read_shape, finish = _finished(sizes, colour if image_size else own_colour, image_size,
                                   grayscale)
    images = DiskImages(_Source("npy", path, tuple(shards), read_shape, finish, starts))
    return ImageSet(images, [])


def _is_npy_input(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".npy"
    return path.is_dir() and not list_files(path) and bool(list_files(path, {".npy"}))


def open_images(path: str | Path, *, image_size: tuple[int, int] | None = None,
                grayscale: bool = False, skip_bad: bool = False) -> ImageSet:
    """A folder of image files or ``.npy`` input, on disk (:func:`open_folder`,
    :func:`open_npy`): what ``Detector.fit`` streams from, e.g.
    ``Detector().fit(open_images("photos/").images)``."""
    path = Path(path)
    if not path.exists():
        raise expected("an existing file or folder of images", f"{path} (not found)",
                       cls=DataError)
    if _is_npy_input(path):
        return open_npy(path, image_size=image_size, grayscale=grayscale)
    if not path.is_dir():
        raise _not_streamable(str(path))
    return open_folder(path, image_size=image_size, grayscale=grayscale, skip_bad=skip_bad)


def is_npy_shards(path: str | Path) -> bool:
    """Whether ``path`` is a folder of ``.npy`` shards (and no image files)."""
    p = Path(path)
    return p.is_dir() and _is_npy_input(p)


def _not_streamable(dataset: str) -> ConfigError:
    return expected("a folder of image files, an MVTec AD folder, a .npy file or a folder of "
                    ".npy shards to stream from disk (--stream always)", repr(dataset),
                    hint="A built-in data set, .npz and .csv files are read into memory: use "
                         "--stream auto or never", cls=ConfigError)


def streamable(dataset: str, builtin: bool = False) -> bool:
    """Whether ``dataset`` can be streamed from disk (``builtin``: it names a built-in set)."""
    p = Path(dataset)
    # A path that does not exist is left to the reader, whose error says so.
    return not builtin and not (p.is_file() and p.suffix.lower() != ".npy")


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's available memory, capped by its
    cgroup's limit less its usage (a container's limit, not the machine's, ends a process)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # not POSIX
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = int(Path("/sys/fs/cgroup", limit).read_text())  # "max": no limit
            used = int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        found.append(max(0, cap - used))
        break
    return min(found) if found else 0


def _header_bytes(file: Path, image_size, grayscale: bool) -> int:
    from PIL import Image

    try:
        with Image.open(file) as img:  # reads the header only
            w, h = img.size
            colour = img.mode in _COLOUR_MODES
    except Exception:  # the scan reports a bad file with the in-memory path's error
        return 0
    if image_size is not None:
        h, w = image_size
    return h * w * (1 if grayscale or not colour else 3) * 4


def decoded_bytes(dataset: str, *, image_size: tuple[int, int] | None = None,
                  grayscale: bool = False) -> int:
    """About how many bytes the training images of ``dataset`` take decoded to float32, from
    file names and headers only: ``.npy`` headers exactly; a folder's image count times the
    largest of :data:`_SAMPLED_HEADERS` evenly spaced files' headers (colour files count 3
    channels, grey-looking or not). 0 for what cannot be streamed."""
    p = Path(dataset)
    if not streamable(dataset) or not p.exists():
        return 0
    if _is_npy_input(p):
        try:
            shards, counts = _npy_rows(p)
        except DataError:  # the reader refuses it with its own words
            return 0
        total = 0
        for shard, n in zip(shards, counts, strict=True):
            dims = np.load(shard, mmap_mode="r", allow_pickle=False).shape[1:]
            if image_size is not None:
                values = image_size[0] * image_size[1] * (1 if grayscale else 3)
            else:
                c = min(dims[2], 3) if len(dims) == 3 else 1
                values = math.prod(dims[:2]) * (1 if grayscale else c)
            total += n * values * 4
        return total
    files = image_files(p / "train" / GOOD) if is_mvtec(p) else list_files(p, IMAGE_SUFFIXES)
    if not files:
        return 0
    step = max(1, len(files) // _SAMPLED_HEADERS)
    per_image = max(_header_bytes(f, image_size, grayscale) for f in files[::step])
    return len(files) * per_image


def _npy_rows(path: Path) -> tuple[list[str], list[int]]:
    shards, starts = _npy_plan(path)
    return shards, [int(n) for n in np.diff(starts)]


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def choose_stream(mode: str, dataset: str, *, builtin: bool = False,
                  image_size: tuple[int, int] | None = None, grayscale: bool = False,
                  memory: int | None = None) -> bool:
    """Whether ``anomaly fit`` streams its training images from disk.

    ``never``: no. ``always``: yes, and a data set that cannot be streamed (``builtin``, a
    ``.npz``/``.csv`` file) is an error. ``auto``: when they can be and :func:`decoded_bytes`
    exceeds :data:`~anomaly.config.STREAM_MEMORY_FRACTION` of ``memory`` (default
    :func:`available_memory`), with a note saying so.
    """
    from anomaly.progress import status

    if mode not in STREAM_MODES:
        raise expected(f"'stream' in {STREAM_MODES}", repr(mode), cls=ConfigError)
    if mode == "never":
        return False
    if not streamable(dataset, builtin):
        if mode == "always":
            raise _not_streamable(dataset)
        return False
    if mode == "always":
        return True
    need = decoded_bytes(dataset, image_size=image_size, grayscale=grayscale)
    memory = available_memory() if memory is None else memory
    if need <= STREAM_MEMORY_FRACTION * memory:
        return False
    status(f"The training images would take {_gib(need)} decoded, more than "
           f"{STREAM_MEMORY_FRACTION:.0%} of the {_gib(memory)} of memory available: streaming "
           "them from disk (--stream never reads them into memory).")
    return True
