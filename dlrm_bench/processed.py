"""Reader of the reference DLRM's processed Criteo file (``--processed-data-file``).

The reference's ``data_utils.getCriteoAdData`` turns the Criteo text into one
``.npz`` of four arrays:

- ``X_int``: samples x 13 integer features, negatives already set to 0;
- ``X_cat``: samples x 26 categoricals, each column renumbered densely over
  the whole dataset, so value ``v`` of column ``j`` is row ``v`` of table
  ``j`` (the reference writes it column-major, often as float64);
- ``y``: the labels;
- ``counts``: the distinct values of each column, the rows of its table.

Its ``CriteoDataset`` then feeds ``log(X_int + 1)`` in float32 and, with
``--max-ind-range M``, ``X_cat % M`` into tables of ``min(counts, M)`` rows.
Read the same way here, so a checkpoint the reference trained on the file
fits the model built from it.  As in the text reader, negative integers are
clamped to 0 (the reference's file holds none).

The whole Kaggle file is 45 million samples, gigabytes per array, and every
rank reads its data itself.  So each array is streamed out of the archive and
only the first ``n`` samples are kept: memory stays the size of what is used
(a column-major ``X_cat`` is read column by column, the rest of each column
read and dropped).  Samples are used in file order; the reference's split
into train, validation and test days is not applied.
"""
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy

from dlrm_bench.criteo import CriteoFormatError, dense_features

ARRAYS = ("X_int", "X_cat", "y", "counts")
INT64_MAX = np.iinfo(np.int64).max
CHUNK = 1 << 22  # bytes decompressed at a time (``beat`` is called after each)
# What a damaged member raises as it is decompressed.  zipfile checks a
# member's CRC only once it is read to its end: a column-major array is
# (_Array.leading_rows), but the first rows of a row-major one are not, and
# damage past them that still inflates passes unseen.
DAMAGED = (zlib.error, zipfile.BadZipFile, EOFError)


class ProcessedFormatError(ValueError):
    """A file that is not the reference's processed Criteo ``.npz``."""


# What a rank raises for a fault in either data file's content: the input's, not the run's.
DATA_ERRORS = (CriteoFormatError, ProcessedFormatError)


class _Array:
    """One ``.npy`` member of the archive, opened at its data: ``shape``, ``fortran``, ``dtype``.

    ``beat`` (if given) is called after every ``CHUNK`` bytes decompressed:
    a sign of progress, since skipping through a column-major ``X_cat`` of
    the whole Kaggle file decompresses gigabytes.
    """

    def __init__(self, archive, path, name, beat=None):
        self.path, self.name, self.beat = path, name, beat
        try:
            self.stream = archive.open(name + ".npy")
        except KeyError:
            raise ProcessedFormatError(f"{path} holds no array {name!r} (it holds "
                                       f"{sorted(n[:-4] for n in archive.namelist())})") from None
        except DAMAGED as exc:
            raise self._damaged(exc) from None
        try:
            version = npy.read_magic(self.stream)
            if version == (1, 0):
                self.shape, self.fortran, self.dtype = npy.read_array_header_1_0(self.stream)
            elif version == (2, 0):
                self.shape, self.fortran, self.dtype = npy.read_array_header_2_0(self.stream)
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
        except DAMAGED as exc:
            self.stream.close()
            raise self._damaged(exc) from None
        except ValueError as exc:
            self.stream.close()
            raise ProcessedFormatError(f"{path}: array {name!r}: {exc}") from None
        if self.dtype.kind not in ("iufb" if name == "y" else "iuf"):  # the reference's y is bool
            self.stream.close()
            raise ProcessedFormatError(f"{path}: array {name!r} has dtype {self.dtype}, "
                                       f"expected integers or floats{' or bools' if name == 'y' else ''}")

    def _damaged(self, exc):
        what = str(exc) or "its compressed data end early"  # zipfile's EOFError says nothing
        return ProcessedFormatError(f"{self.path}: array {self.name!r} is damaged: {what}")

    def _chunks(self, nbytes):
        """The next ``nbytes`` of the member, ``CHUNK`` at a time; a damaged or short member is refused."""
        while nbytes > 0:
            try:
                data = self.stream.read(min(nbytes, CHUNK))
            except DAMAGED as exc:
                raise self._damaged(exc) from None
            if not data:
                raise ProcessedFormatError(f"{self.path}: array {self.name!r} ends early: truncated file")
            nbytes -= len(data)
            if self.beat is not None:
                self.beat()
            yield data

    def _read(self, count):
        out = bytearray(count * self.dtype.itemsize)
        at = 0
        for data in self._chunks(len(out)):
            out[at:at + len(data)] = data
            at += len(data)
        return np.frombuffer(out, self.dtype)

    def _drop(self, count):
        for _ in self._chunks(count * self.dtype.itemsize):
            pass

    def leading_rows(self, n, columns=None):
        """The first ``n`` rows (of ``columns`` only, if given; 1-D arrays: the first ``n`` values).

        A 2-D result is in the member's order, except that ``columns`` of a
        row-major member are made column-major (a column's values contiguous);
        a column-major member's other columns are skipped unkept.
        """
        if len(self.shape) == 1:
            return self._read(n)
        if not self.fortran:  # row-major: the columns are interleaved, so all of them are read
            values = self._read(n * self.shape[1]).reshape(n, self.shape[1])
            return values if columns is None else np.asfortranarray(values[:, columns])
        columns = range(self.shape[1]) if columns is None else columns
        rows, cols = self.shape
        out = np.empty((len(columns), n), self.dtype)
        at = {j: i for i, j in enumerate(columns)}
        for j in range(cols):  # column-major: column j is rows values in a row
            if j in at:
                out[at[j]] = self._read(n)
                self._drop(rows - n)
            else:
                self._drop(rows)
        # Nearly all of it was read: reading to its end (1/cols more) makes
        # zipfile check its CRC, so damage that still inflates is found too.
        try:
            self.stream.read(1)
        except DAMAGED as exc:
            raise self._damaged(exc) from None
        return out.T

    def close(self):
        self.stream.close()


def _open(path):
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ProcessedFormatError(f"{path} is not an .npz archive: {exc}") from None


def _headers(archive, path):
    """Shapes checked: ``(samples, dense features, sparse features)``."""
    shapes = {}
    for name in ("X_int", "X_cat", "y"):
        a = _Array(archive, path, name)
        a.close()
        shapes[name] = a.shape
    x_int, x_cat, y = shapes["X_int"], shapes["X_cat"], shapes["y"]
    if len(x_int) != 2 or len(x_cat) != 2 or len(y) != 1:
        raise ProcessedFormatError(f"{path}: X_int {x_int}, X_cat {x_cat} and y {y} should be "
                                   f"samples x features, samples x features and samples")
    if not x_int[0] == x_cat[0] == y[0]:
        raise ProcessedFormatError(f"{path}: X_int, X_cat and y hold {x_int[0]}, {x_cat[0]} and "
                                   f"{y[0]} samples; they should hold the same number")
    return y[0], x_int[1], x_cat[1]


def _counts(archive, path, num_sparse):
    a = _Array(archive, path, "counts")
    try:
        if len(a.shape) != 1 or a.shape[0] != num_sparse:
            raise ProcessedFormatError(f"{path}: counts has shape {a.shape}, expected ({num_sparse},): "
                                       f"one per column of X_cat")
        counts = a.leading_rows(num_sparse)
    finally:
        a.close()
    if a.dtype.kind == "f" and not np.array_equal(counts, np.floor(counts)):
        raise ProcessedFormatError(f"{path}: counts are not whole numbers")
    counts = counts.astype(np.int64)
    if np.any(counts <= 0):
        j = int(np.flatnonzero(counts <= 0)[0])
        raise ProcessedFormatError(f"{path}: counts[{j}] is {counts[j]}: every table needs a row")
    return tuple(int(c) for c in counts)


def describe(path):
    """``(samples, dense features, counts)`` of a processed file, reading only its headers and counts."""
    with _open(path) as archive:
        samples, num_dense, num_sparse = _headers(archive, path)
        return samples, num_dense, _counts(archive, path, num_sparse)


def table_rows(counts, max_ind_range):
    """The reference's table sizes: ``counts``, capped at ``max_ind_range`` when it is positive."""
    return tuple(min(c, max_ind_range) if max_ind_range > 0 else c for c in counts)


def read(path, num_samples, max_ind_range, beat=None, tables=None):
    """Labels ``(n,)``, dense ``(n, 13)`` float32 and categoricals ``(n, T)`` int64 of the first ``n`` samples.

    The categoricals are those of ``tables`` (default: every one), column-major;
    a column-major ``X_cat``'s other columns are skipped, not kept.
    ``beat``: see :class:`_Array`.
    """
    with _open(path) as archive:
        samples, _, num_sparse = _headers(archive, path)
        if samples < num_samples:
            raise ProcessedFormatError(f"{path} has {samples} samples, {num_samples} needed")
        rows = table_rows(_counts(archive, path, num_sparse), max_ind_range)
        tables = list(range(num_sparse) if tables is None else tables)
        if len(set(tables)) != len(tables) or not all(0 <= j < num_sparse for j in tables):
            raise ValueError(f"tables must be distinct columns of X_cat's {num_sparse}, got {tables}")
        arrays = {}
        for name in ("X_int", "X_cat", "y"):
            a = _Array(archive, path, name, beat)
            try:
                arrays[name] = a.leading_rows(num_samples, tables if name == "X_cat" else None)
            finally:
                a.close()
    labels = arrays["y"].astype(np.float32)
    return labels, _dense(arrays["X_int"], path), _indices(arrays["X_cat"], tables, rows, max_ind_range, path)


def _dense(x_int, path):
    """``X_int`` through the reference's transform; refuses values that would make predictions NaN.

    The reference's file holds whole numbers; a float ``X_int`` with an
    inf, a NaN or a value past float32's range would turn every prediction
    of its sample into NaN (and ``--verify`` would still find the NaNs equal).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # what overflows is named below
        dense = dense_features(x_int)
    finite = np.isfinite(dense)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise ProcessedFormatError(f"{path}: X_int[{i}, {j}] is {x_int[i, j]}: not a count "
                                   f"(a NaN, or past float32's range)")
    return dense


def _indices(x_cat, tables, rows, max_ind_range, path):
    """``X_cat``'s columns of ``tables`` as table rows (int64, column-major), ``% max_ind_range`` when
    capped; refuses rows past a table's end.  A column at a time, so no temporary is the whole array."""
    out = np.empty((len(tables), x_cat.shape[0]), dtype=np.int64)
    for k, j in enumerate(tables):
        column = x_cat[:, k]
        if column.dtype.kind in "fu":  # a whole number int64 holds, or the conversion wraps it
            if column.dtype.kind == "u":
                whole = column <= INT64_MAX
            else:  # 2.0 ** 63 is INT64_MAX as a float: < it, not <=
                whole = np.isfinite(column) & (column == np.floor(column)) & (np.abs(column) < 2.0 ** 63)
            if not whole.all():
                i = int(np.argmin(whole))
                raise ProcessedFormatError(f"{path}: X_cat[{i}, {j}] is {column[i]}, not a row number")
        values = out[k]
        values[:] = column
        if max_ind_range > 0:
            values %= max_ind_range
        bad = (values < 0) | (values >= rows[j])
        if bad.any():
            i = int(np.argmax(bad))
            raise ProcessedFormatError(f"{path}: X_cat[{i}, {j}] is {values[i]}, outside table {j}, "
                                       f"which has {rows[j]} rows")
    return out.T
