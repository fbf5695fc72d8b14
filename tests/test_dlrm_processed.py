"""--processed-data-file: the reference DLRM's processed Criteo ``.npz`` feeds dataset mode.

The files are written here as the reference's ``data_utils`` writes them:
``np.savez_compressed`` of ``X_int`` (int32), ``X_cat`` (float64 row numbers,
column-major: the transpose of a columns x samples array), ``y`` and
``counts``.  What a rank reads is compared with the reference's
``CriteoDataset`` transforms restated here (``torch.log(X_int + 1)`` in float32,
``X_cat % max_ind_range``), and a checkpoint whose tables have the counts'
sizes is run and compared with a forward pass written here.
"""

import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrm_bench import backends, cli, config, processed, report, verify
from dlrm_cli_check import assert_rejected
from dlrm_reference import random_state_dict

SAMPLES = 23
TABLES = 26
D = 4
BOT = (13, D)
NUM_FEATURES = TABLES + 1
TOP = (D + NUM_FEATURES * (NUM_FEATURES - 1) // 2, 3, 1)


def reference_arrays(seed=3):
    """``(X_int, X_cat, y, counts)`` as the reference's preprocessing leaves them."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, TABLES)
    x_cat_t = np.zeros((TABLES, SAMPLES))  # float64, as the reference's np.zeros
    for j in range(TABLES):
        x_cat_t[j] = rng.integers(0, counts[j], SAMPLES)
    x_int = rng.integers(0, 10 ** 6, (SAMPLES, 13)).astype(np.int32)
    x_int[0, :3] = 0
    y = rng.integers(0, 2, SAMPLES).astype(np.int32)
    return x_int, np.transpose(x_cat_t), y, counts


def write_processed(path, x_int, x_cat, y, counts, save=np.savez_compressed):
    save(path, X_cat=x_cat, X_int=x_int, y=y, counts=counts)
    return path


@pytest.fixture
def processed_file(tmp_path):
    arrays = reference_arrays()
    return write_processed(tmp_path / "kaggle_processed.npz", *arrays), arrays


def run_flags(path, *extra):
    return ["--data-generation", "dataset", "--processed-data-file", str(path),
            "--arch-sparse-feature-size", str(D), "--arch-mlp-bot", "-".join(map(str, BOT)),
            "--mini-batch-size", "5", "--nprocs", "2", "--lag", "1", "--warmup-batches", "0",
            "--num-batches", "100", "--timeout", "60", "--no-progress", *extra]


# ---------------------------------------------------------------- reader

LAYOUTS = {
    "compressed, column-major float64 (the reference's)": (np.savez_compressed, lambda x: x),
    "plain, row-major int32": (np.savez, lambda x: np.ascontiguousarray(x).astype(np.int32)),
    "plain, big-endian int64": (np.savez, lambda x: np.ascontiguousarray(x).astype(">i8")),
}


@pytest.mark.parametrize("cap", [-1, 7])
@pytest.mark.parametrize("save, layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_read_gives_what_the_reference_dataset_feeds(tmp_path, monkeypatch, save, layout, cap):
    """The first n samples, transformed as the reference's CriteoDataset does, however the file stores them."""
    monkeypatch.setattr(processed, "CHUNK", 24)  # read and drop each column in several pieces
    x_int, x_cat, y, counts = reference_arrays()
    path = write_processed(tmp_path / "p.npz", x_int, layout(x_cat), y, counts, save)

    labels, dense, sparse = processed.read(path, 20, cap)

    np.testing.assert_array_equal(labels, y[:20].astype(np.float32))
    assert dense.dtype == np.float32 and sparse.dtype == np.int64
    # The reference's own expression: numpy's log differs in the last bit for some values.
    np.testing.assert_array_equal(dense, torch.log(torch.tensor(x_int[:20], dtype=torch.float) + 1).numpy())
    want = x_cat[:20].astype(np.int64)
    np.testing.assert_array_equal(sparse, want % cap if cap > 0 else want)


@pytest.mark.parametrize("save, layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_rank_reads_only_its_tables_columns_and_keeps_each_contiguous(tmp_path, monkeypatch, save, layout):
    # Every rank kept all 26 columns (and whole-array temporaries): twice the
    # memory the run's check counted.
    monkeypatch.setattr(processed, "CHUNK", 24)
    x_int, x_cat, y, counts = reference_arrays()
    path = write_processed(tmp_path / "p.npz", x_int, layout(x_cat), y, counts, save)
    _, _, every = processed.read(path, 20, 7)
    kept = []
    read = processed._Array._read
    monkeypatch.setattr(processed._Array, "_read", lambda self, count: kept.append((self.name, count))
                        or read(self, count))
    labels, dense, sparse = processed.read(path, 20, 7, tables=[25, 3])
    np.testing.assert_array_equal(sparse, every[:, [25, 3]])
    assert sparse.shape == (20, 2) and sparse.T.flags.c_contiguous  # a table's column: one slice
    held = sum(count for name, count in kept if name == "X_cat")
    assert held == (2 * 20 if layout(x_cat).flags.f_contiguous else 26 * 20)  # row-major: interleaved
    with pytest.raises(ValueError, match=r"tables must be distinct columns of X_cat's 26, got \[3, 3\]"):
        processed.read(path, 20, 7, tables=[3, 3])  # the second was left unwritten


@pytest.mark.parametrize("value", [1e20, 2.0 ** 63, -(2.0 ** 63) * 2, np.uint64(2 ** 63)], ids=str)
def test_a_row_number_past_int64_is_refused_not_wrapped(tmp_path, value):
    # 1e20 became row 6 of a table of 7 (int64's conversion gave -2**63).
    x_int, x_cat, y, counts = reference_arrays()
    x_cat = x_cat.astype(np.uint64 if isinstance(value, np.uint64) else np.float64)
    x_cat[4, 9] = value
    path = write_processed(tmp_path / "p.npz", x_int, x_cat, y, counts, np.savez)
    with pytest.raises(processed.ProcessedFormatError, match=r"X_cat\[4, 9\] is .*, not a row number"):
        processed.read(path, 20, 7)


def test_bool_labels_as_the_reference_describes_them_are_read(tmp_path):
    x_int, x_cat, y, counts = reference_arrays()
    path = write_processed(tmp_path / "p.npz", x_int, x_cat, y.astype(bool), counts, np.savez_compressed)
    labels, _, _ = processed.read(path, 20, -1)
    np.testing.assert_array_equal(labels, y[:20].astype(bool).astype(np.float32))


def test_describe_reads_the_counts_and_the_shapes(processed_file):
    path, (_, _, _, counts) = processed_file
    assert processed.describe(path) == (SAMPLES, 13, tuple(int(c) for c in counts))


def test_config_sizes_the_tables_by_the_counts_capped_like_the_reference(processed_file):
    """Tables of ``counts`` rows, ``min(counts, M)`` with --max-ind-range M; whole batches of the file."""
    path, (_, _, _, counts) = processed_file
    cfg, _ = config.parse(run_flags(path))
    assert cfg.table_rows == tuple(int(c) for c in counts)
    assert cfg.num_batches == SAMPLES // 5 and cfg.data_batches == cfg.num_batches
    cfg, _ = config.parse(run_flags(path, "--max-ind-range", "20"))
    assert cfg.table_rows == tuple(min(int(c), 20) for c in counts)


def test_the_raw_file_is_not_read_when_the_processed_one_is_given(processed_file, tmp_path):
    """As in the reference, which reads --raw-data-file only to make the processed file."""
    path, _ = processed_file
    cfg, _ = config.parse(run_flags(path, "--raw-data-file", str(tmp_path / "never_made.txt")))
    assert cfg.processed_data_file == str(path)


@pytest.mark.timeout(120)
def test_distributed_run_on_the_processed_file_matches_single_process_bit_for_bit(processed_file):
    path, _ = processed_file
    cfg, _ = config.parse(run_flags(path, "--max-ind-range", "20"))
    pred = report.predictions(backends.run(cfg, "t"))
    assert pred.shape == (4, 5)
    ref = verify.reference_predictions(cfg)
    assert ref.std() > 0
    assert verify.compare(pred, ref) == (0, 0.0, 0)


# ------------------------------------------- a reference checkpoint fits it


def independent_forward(sd, x_int, x_cat):
    """Click probabilities in float64 from the DLRM definition, the inputs as the reference feeds them."""
    p = {k: v.double() for k, v in sd.items()}
    x = torch.log(torch.tensor(x_int, dtype=torch.float) + 1).double()
    for k in range(len(BOT) - 1):
        x = F.relu(F.linear(x, p[f"bot_l.{2 * k}.weight"], p[f"bot_l.{2 * k}.bias"]))
    rows = torch.tensor(x_cat, dtype=torch.long)
    features = [x] + [F.embedding(rows[:, t], p[f"emb_l.{t}.weight"]) for t in range(TABLES)]
    stacked = torch.stack(features, dim=1)
    z = torch.bmm(stacked, stacked.transpose(1, 2))
    r = torch.cat([x, torch.stack([z[:, i, j] for i in range(NUM_FEATURES) for j in range(i)], dim=1)], dim=1)
    for k in range(len(TOP) - 1):
        r = F.linear(r, p[f"top_l.{2 * k}.weight"], p[f"top_l.{2 * k}.bias"])
        r = torch.sigmoid(r) if k == len(TOP) - 2 else F.relu(r)
    return r.view(-1).numpy()


@pytest.mark.timeout(120)
def test_a_checkpoint_with_the_counts_tables_predicts_what_its_weights_give(processed_file, tmp_path):
    """Dataset mode on the text refuses such a checkpoint (tables of --max-ind-range rows); this one runs it."""
    path, (x_int, x_cat, _, counts) = processed_file
    sd = random_state_dict(counts, BOT, TOP, D, seed=11)  # tables of the counts' sizes
    ckpt = tmp_path / "dlrm.pt"
    torch.save({"state_dict": sd, "epoch": 1}, ckpt)
    cfg, _ = config.parse(run_flags(path, "--load-model", str(ckpt), "--arch-mlp-top", "-".join(map(str, TOP[1:]))))

    pred = report.predictions(backends.run(cfg, "t"))

    expected = independent_forward(sd, x_int[:20], x_cat[:20]).reshape(4, 5)
    assert expected.std() > 0.05
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------- rejections


@pytest.mark.parametrize("more", [True, False], ids=["more rows", "fewer rows"])
def test_a_checkpoint_whose_tables_differ_from_the_counts_names_the_counts(processed_file, tmp_path, capsys,
                                                                        no_dlrm_runs, more):
    # The message said "the flags give", though no flag gives the sizes here;
    # with fewer rows it did not say that --max-ind-range caps them.
    path, (_, _, _, counts) = processed_file
    rows = counts + 1 if more else np.maximum(counts - 1, 1)
    j = int(np.flatnonzero(rows != counts)[0])
    ckpt = tmp_path / "dlrm.pt"
    torch.save({"state_dict": random_state_dict(rows, BOT, TOP, D, seed=11)}, ckpt)
    hint = "a model trained with --max-ind-range M has tables of at most M rows"
    argv = run_flags(path, "--load-model", str(ckpt), "--arch-mlp-top", "-".join(map(str, TOP[1:])))
    said = assert_rejected(capsys, argv, "--load-model", f"emb_l.{j}.weight has shape ({rows[j]}, {D})",
                           f"expected ({counts[j]}, {D}), from the counts of --processed-data-file {path}")
    assert (hint in said) == (not more)


def _mutated(tmp, **changes):
    x_int, x_cat, y, counts = reference_arrays()
    arrays = {**dict(X_int=x_int, X_cat=x_cat, y=y, counts=counts), **changes}
    path = tmp / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _truncated(tmp):
    path = write_processed(tmp / "p.npz", *reference_arrays(), save=np.savez)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


REJECTIONS = [
    ("missing file", lambda tmp: tmp / "nowhere.npz", [], ["--processed-data-file", "nowhere.npz", "no such file", "getCriteoAdData"]),
    ("not an archive", lambda tmp: (tmp / "t.npz", (tmp / "t.npz").write_text("0\t1\n"))[0], [],
     ["--processed-data-file", "is not an .npz archive"]),
    ("truncated archive", _truncated, [], ["--processed-data-file", "is not an .npz archive"]),
    ("no counts", lambda tmp: _mutated(tmp, counts=None), [], ["--processed-data-file", "no array 'counts'"]),
    ("samples that disagree", lambda tmp: _mutated(tmp, y=np.zeros(SAMPLES - 1)), [],
     ["--processed-data-file", "hold 23, 23 and 22 samples"]),
    ("a count per column missing", lambda tmp: _mutated(tmp, counts=np.ones(TABLES - 1)), [],
     ["--processed-data-file", "counts has shape (25,)", "(26,)"]),
    ("an empty table", lambda tmp: _mutated(tmp, counts=np.arange(TABLES)), [], ["--processed-data-file", "counts[0] is 0"]),
    ("strings", lambda tmp: _mutated(tmp, X_int=np.full((SAMPLES, 13), "a")), [], ["--processed-data-file", "'X_int'", "dtype <U1"]),
    ("fewer samples than a batch", lambda tmp: _mutated(tmp), ["--mini-batch-size", "50"],
     ["--processed-data-file", "23 samples", "--mini-batch-size of 50"]),
    ("bottom MLP not on its features", lambda tmp: _mutated(tmp), ["--arch-mlp-bot", "12-4"],
     ["--arch-mlp-bot must start with 13"]),
    ("table sizes given too", lambda tmp: _mutated(tmp), ["--arch-embedding-size", "4-4"],
     ["--arch-embedding-size does not apply"]),
    ("damaged counts", lambda tmp: _damaged(tmp, "counts.npy"), [], ["--processed-data-file", "array 'counts'"]),
]


@pytest.mark.parametrize("make, extra, words", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_cli_rejects_a_bad_processed_file(tmp_path, capsys, no_dlrm_runs, make, extra, words):
    """Exit 2 and one line naming the problem, before any process starts."""
    path = make(tmp_path)
    assert_rejected(capsys, run_flags(path, *extra), *words)


def test_processed_file_without_dataset_mode_is_rejected(processed_file, capsys, no_dlrm_runs):
    path, _ = processed_file
    assert_rejected(capsys, ["--processed-data-file", str(path)],
                    "--processed-data-file needs --data-generation dataset")


@pytest.mark.parametrize("value, words", [(60.0, ["X_cat[", "is 60, outside table", "rows"]),
                                          (2.5, ["X_cat[", "is 2.5, not a row number"])])
def test_read_refuses_a_row_past_its_table(tmp_path, value, words):
    """Found only when a rank reads its samples: the error names the sample and column."""
    x_int, x_cat, y, counts = reference_arrays()
    x_cat = x_cat.copy()
    x_cat[4, 2] = value
    path = write_processed(tmp_path / "p.npz", x_int, x_cat, y, np.maximum(counts, 3))
    with pytest.raises(processed.ProcessedFormatError) as info:
        processed.read(path, 10, -1)
    for word in words:
        assert word in str(info.value)


@pytest.mark.timeout(120)
def test_a_row_past_its_table_found_by_a_rank_is_one_line_naming_the_file(tmp_path, capsys):
    """As for bad flags (exit 2, one line): it was the rank's traceback, and --compare tried every backend."""
    x_int, x_cat, y, counts = reference_arrays()
    x_cat = x_cat.copy()
    x_cat[4, 2] = 60
    path = write_processed(tmp_path / "p.npz", x_int, x_cat, y, np.maximum(counts, 3))
    assert cli.main(run_flags(path, "--compare")) == 2
    out, err = capsys.readouterr()
    assert "failed" not in out, out
    assert err.splitlines()[-1] == (f"dlrm_bench: error: --processed-data-file {path}: X_cat[4, 2] is 60, "
                                    f"outside table 2, which has {max(counts[2], 3)} rows"), err


def _damaged(tmp, member="X_int.npy", path=None):
    """A compressed file (``path``, else one of reference_arrays) with bytes in the middle of
    ``member``'s compressed data overwritten."""
    path = path or write_processed(tmp / "p.npz", *reference_arrays())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    # The member's data follows its 30-byte local header, name and extra field.
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    middle = start + info.compress_size // 2
    data[middle:middle + 40] = bytes(b ^ 0x5A for b in data[middle:middle + 40])
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_array_is_named_not_a_zlib_traceback(tmp_path):
    """What zlib or zipfile raises on damaged bytes becomes the reader's error, naming file and array."""
    path = _damaged(tmp_path)  # small: inflated with its header
    with pytest.raises(processed.ProcessedFormatError, match=r"p\.npz: array 'X_int' is damaged"):
        processed.read(path, SAMPLES, -1)


def test_damage_found_while_skipping_through_a_column_is_named_too(tmp_path, monkeypatch):
    """Damage far past the header surfaces in the chunked reads (a wide X_cat of random rows)."""
    monkeypatch.setattr(processed, "CHUNK", 1 << 12)
    rng = np.random.default_rng(5)
    n = 4000
    x_int = rng.integers(0, 100, (n, 13)).astype(np.int32)
    x_cat = np.transpose(rng.integers(0, 50, (TABLES, n)).astype(np.float64))  # column-major, as the reference's
    arrays = (x_int, x_cat, rng.integers(0, 2, n).astype(np.int32), np.full(TABLES, 50))
    path = write_processed(tmp_path / "p.npz", *arrays)
    path = _damaged(tmp_path, "X_cat.npy", path)
    assert processed.describe(path)[0] == n  # the headers and counts are intact
    with pytest.raises(processed.ProcessedFormatError, match=r"p\.npz: array 'X_cat' is damaged"):
        processed.read(path, 10, -1)


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e39])
def test_read_refuses_dense_values_that_would_make_predictions_nan(tmp_path, value):
    """As the text reader does: an inf, a NaN or a value past float32 in X_int is named, not fed to the model."""
    x_int, x_cat, y, counts = reference_arrays()
    x_int = x_int.astype(np.float64)
    x_int[3, 5] = value
    path = write_processed(tmp_path / "p.npz", x_int, x_cat, y, counts)
    with pytest.raises(processed.ProcessedFormatError, match=r"X_int\[3, 5\] is .*: not a count"):
        processed.read(path, 10, -1)


def test_read_beats_as_it_decompresses(tmp_path, monkeypatch):
    """A watchdog (mpirun's, see backends.run_mpi) hears from a rank while it skips through column-major X_cat."""
    monkeypatch.setattr(processed, "CHUNK", 64)
    path = write_processed(tmp_path / "p.npz", *reference_arrays())
    beats = []
    processed.read(path, 10, -1, beat=lambda: beats.append(1))
    x_cat_bytes = SAMPLES * TABLES * 8  # column-major float64: read to its end
    assert len(beats) >= x_cat_bytes // 64


def test_a_seed_that_would_change_nothing_is_refused(processed_file, tmp_path, capsys, no_dlrm_runs):
    """Data from the file, weights from the checkpoint, no delays: the seed has nothing left to seed."""
    path, (_, _, _, counts) = processed_file
    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": random_state_dict(counts, BOT, TOP, D, seed=11)}, ckpt)
    flags = run_flags(path, "--load-model", str(ckpt), "--arch-mlp-top", "-".join(map(str, TOP[1:])))
    assert_rejected(capsys, flags + ["--numpy-rand-seed", "7"], "--numpy-rand-seed changes nothing", "--load-model")
    # With delays the seed draws them.
    cfg, _ = config.parse(flags + ["--numpy-rand-seed", "7", "--delay-prob", "0.1", "--delay-ms", "1"])
    assert cfg.seed == 7
