"""Reader of the Criteo Kaggle display-advertising text format.

One sample per line, tab-separated: the label, 13 integer features and 26
categorical features written in hexadecimal; any field may be empty.  Read
as the reference DLRM's ``data_utils`` reads the text:

- integers: empty is 0, negatives are clamped to 0, then ``log(x + 1)``
  (float32);
- categoricals: empty is 0, else ``int(hex, 16) % max_ind_range``, one index
  per table (table ``i`` is categorical column ``i``), a bag of one row.

The reference then renumbers each column's distinct values densely (its
``convertDicts``, built over the whole dataset), so its tables have as many
rows as a column has distinct values.  That renumbering is not done here: the
hashed value is the row, and every table has ``max_ind_range`` rows.  The
rows are therefore not those of a model the reference trained on this data,
and such a checkpoint (tables of other sizes) is refused by ``--load-model``;
for such a checkpoint, read the reference's processed file instead (``--processed-data-file``,
read by :mod:`dlrm_bench.processed`).

Samples are used in file order: global batch ``b`` is lines
``b * B .. (b + 1) * B - 1``; a last partial batch is not used.
"""
import re

import numpy as np

from dlrm_bench.data import Bags, RankData

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
BEAT_EVERY = 4096  # lines: how often read() calls its beat (see read)


class CriteoFormatError(ValueError):
    """A line that is not in the Criteo Kaggle format."""


MAX_LINE = 1 << 16  # bytes: a Criteo line is a few hundred; a longer one is another format


def count_samples(path, limit=None):
    """Number of lines in ``path``, counting no further than ``limit``.

    Checks each line's field count on the way (cheap), so a file in another
    format (gzip, a zip archive, lone-CR line endings) is refused, saying
    which, before any rank starts reading it.  Blank lines that end the file
    end the data (an editor's or a ``cat``'s extra newline); a blank line
    before a sample is refused.
    """
    n = 0
    with open(path, "rb") as f:
        _refuse_other_formats(f.read(4))
        f.seek(0)
        while limit is None or n < limit:
            line = f.readline(MAX_LINE + 1)
            if not line:
                break
            n += 1
            if len(line) > MAX_LINE:
                raise CriteoFormatError(f"line {n} is longer than {MAX_LINE} bytes: not the Criteo "
                                        f"format{_lone_cr_hint(line)}")
            if not line.strip(b"\r\n") and _only_blank_lines_follow(f):
                return n - 1
            fields = line.count(b"\t") + 1
            if fields != NUM_FIELDS:
                raise CriteoFormatError(f"line {n}: {fields} tab-separated fields, expected {NUM_FIELDS}"
                                        f"{_lone_cr_hint(line)}")
    return n


def _lone_cr_hint(line):
    """What to add to a line's error when a CR falls inside it (a line end "\\n" would have ended it)."""
    return " (its lines end in a lone CR?)" if b"\r" in line.rstrip(b"\r\n") else ""


def _refuse_other_formats(head):
    """Name the format of a file that starts as a gzip file or a zip archive does."""
    if head.startswith(b"\x1f\x8b"):
        raise CriteoFormatError("it is gzip-compressed: decompress it first (gunzip -k), "
                                "as the reference reads day files")
    if head.startswith(b"PK\x03\x04"):
        raise CriteoFormatError("it is a zip archive: a processed .npz file is read with "
                                "--processed-data-file")


def _only_blank_lines_follow(f):
    """Whether the rest of ``f`` is blank lines (a blank line in the middle is an error)."""
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return True
        if line.strip(b"\r\n"):
            return False


def dense_features(ints):
    """The reference's transform of integer features (float32, any shape): ``log(max(x, 0) + 1)``.

    Computed as the reference computes it, with ``torch.log`` in float32
    (``dlrm_data_pytorch.py``, ``torch.log(torch.tensor(X_int, dtype=torch.float) + 1)``):
    numpy's ``log`` differs in the last bit for some common values (36, 48, 178).
    """
    import torch
    clamped = np.maximum(np.asarray(ints, dtype=np.float32), np.float32(0))
    return torch.log(torch.from_numpy(clamped) + 1).numpy()


ALL_COLUMNS = range(1 + NUM_DENSE, NUM_FIELDS)  # the categorical fields
PLAIN_INTEGER = re.compile(r"\s*([+-]?)[0-9]+\s*")


def _fields(line, max_ind_range, lineno):
    """``(label, ints[13] float32, sparse[26] int64)`` of one line, the integers not yet transformed."""
    fields = _split(line, lineno)
    label, cats = _label_and_indices(fields, ALL_COLUMNS, max_ind_range, lineno)
    return label, _ints(fields, lineno), np.array(cats, dtype=np.int64)


def _split(line, lineno):
    """A line's fields, checked to be as many as the format has."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != NUM_FIELDS:
        raise CriteoFormatError(f"line {lineno}: {len(fields)} tab-separated fields, expected {NUM_FIELDS}")
    return fields


def _label_and_indices(fields, columns, max_ind_range, lineno):
    """The label and the hashed categoricals of fields ``columns`` (empty: 0)."""
    try:
        label = int(fields[0]) if fields[0] else 0
    except ValueError:
        raise CriteoFormatError(f"line {lineno}: the label (field 1) {_show(fields[0])} "
                                f"is not an integer") from None
    if not -2 ** 31 <= label < 2 ** 31:  # the reference keeps labels as int32 (a click is 1)
        raise CriteoFormatError(f"line {lineno}: the label (field 1) {_show(fields[0])} "
                                f"is out of range (a 32-bit integer)")
    try:
        return label, [int(fields[c], 16) % max_ind_range if fields[c] else 0 for c in columns]
    except ValueError:
        c = next(c for c in columns if not _is_hex(fields[c]))
        raise CriteoFormatError(f"line {lineno}: categorical feature C{c - NUM_DENSE} (field {c + 1}) "
                                f"{_show(fields[c])} is not hexadecimal") from None


def _is_hex(text):
    try:
        int(text, 16) if text else 0
    except ValueError:
        return False
    return True


def _show(text):
    """A field for a message: quoted, long ones cut."""
    return repr(text if len(text) <= 24 else text[:20] + "...")


def _ints(fields, lineno):
    """The integer features of a line's ``fields``, as float32, negatives as 0, not yet transformed.

    Negatives become 0 here, as the transform makes them (``log(max(x, 0) + 1)``),
    so that only a positive value past float32's range (3.4e38) is refused.
    """
    limit = float(np.finfo(np.float32).max)
    ints = []
    for k, x in enumerate(fields[1:1 + NUM_DENSE], start=1):
        try:
            value = max(int(x), 0) if x else 0  # int() as the reference's: " 5" and "1_000" too
        except ValueError:
            whole = PLAIN_INTEGER.fullmatch(x)  # then past int()'s 4300 digits: no other cause
            if whole is None:
                raise CriteoFormatError(f"line {lineno}: integer feature I{k} (field {k + 1}) {_show(x)} "
                                        f"is not an integer") from None
            value = 0 if whole[1] == "-" else None
        if value is None or value > limit:
            raise CriteoFormatError(f"line {lineno}: integer feature I{k} (field {k + 1}) {_show(x)} "
                                    f"is too large for float32")
        ints.append(value)
    return np.array(ints, dtype=np.float32)


def parse_line(line, max_ind_range, lineno=0):
    """``(label, dense[13] float32, sparse[26] int64)`` of one line."""
    label, ints, cats = _fields(line, max_ind_range, lineno)
    return label, dense_features(ints), cats


def read(path, num_samples, max_ind_range, tables=range(NUM_SPARSE), rows=None, beat=None):
    """Labels ``(n,)``, dense ``(n', 13)`` and categoricals ``(n, len(tables))`` of the first ``n`` lines.

    Only what a rank needs is parsed: the categorical columns ``tables``
    and, with ``rows = (B, lo, hi)``, the dense features of lines ``lo`` to
    ``hi - 1`` of every ``B`` (``n'`` of them; all ``n`` without ``rows``).
    Every line's field count and label are checked.  ``beat`` (if given) is
    called every few thousand lines: a sign of progress to a watchdog.
    """
    tables = list(tables)
    columns = [1 + NUM_DENSE + t for t in tables]
    B, lo, hi = rows if rows is not None else (1, 0, 1)
    labels = np.zeros(num_samples, dtype=np.float32)
    whole, rest = divmod(num_samples, B)
    ints = np.zeros((whole * (hi - lo) + max(0, min(hi, rest) - lo), NUM_DENSE), dtype=np.float32)
    # Stored a table's column at a time, so that a batch's indices of one
    # table are a contiguous slice (rank_data keeps them without a copy).
    sparse = np.zeros((len(tables), num_samples), dtype=np.int64).T
    n = d = 0
    # Lines end at "\n" only, as count_samples counts them (universal newlines
    # would also end one at a lone "\r"); _split strips a "\r\n" ending.
    with open(path, encoding="ascii", errors="replace", newline="\n") as f:
        try:
            for line in f:
                if n >= num_samples:
                    break
                fields = _split(line, n + 1)
                labels[n], sparse[n] = _label_and_indices(fields, columns, max_ind_range, n + 1)
                if lo <= n % B < hi:
                    ints[d] = _ints(fields, n + 1)
                    d += 1
                n += 1
                if beat is not None and n % BEAT_EVERY == 0:
                    beat()
        except CriteoFormatError as exc:  # the parent checked only the field counts
            raise CriteoFormatError(f"{path}: {exc}") from None
    if n < num_samples:
        raise CriteoFormatError(f"{path} has {n} samples, {num_samples} needed")
    return labels, dense_features(ints), sparse


def rank_data(cfg, tables, lo, hi, num_batches, beat=None):
    """The :class:`RankData` of one rank: bags of ``tables``, dense rows ``lo:hi`` of each batch.

    Read from the reference's processed file when the run names one, else
    from the text (parsing only this rank's columns and rows); ``beat``: see :func:`read`.
    """
    B = cfg.batch_size
    tables = list(tables)
    if cfg.processed_data_file is not None:
        from dlrm_bench import processed
        _, dense, sparse = processed.read(cfg.processed_data_file, num_batches * B, cfg.max_ind_range, beat,
                                          tables)
        dense = dense.reshape(num_batches, B, -1)[:, lo:hi].reshape(num_batches * (hi - lo), -1)
    else:
        _, dense, sparse = read(cfg.raw_data_file, num_batches * B, cfg.max_ind_range, tables, (B, lo, hi), beat)
    one_each = np.arange(B + 1, dtype=np.int64)  # every bag holds exactly one row
    # Both readers store a table's column contiguously: each batch's slice is
    # a view, not a copy (a copy per batch held the indices twice).
    bags = [{t: Bags(np.ascontiguousarray(sparse[b * B:(b + 1) * B, j]), one_each) for j, t in enumerate(tables)}
            for b in range(num_batches)]
    dense_slices = [np.ascontiguousarray(dense[b * (hi - lo):(b + 1) * (hi - lo)]) for b in range(num_batches)]
    return RankData(bags, dense_slices, num_batches)
