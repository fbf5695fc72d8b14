"""--data-generation dataset: the Criteo Kaggle text reader and the runs it feeds.

A line is a label, 13 integer fields and 26 hexadecimal categorical fields,
tab-separated, any of them possibly empty.  The reference DLRM preprocessing
is restated here independently: integers ``log(max(x, 0) + 1)`` in float32,
categoricals ``int(h, 16) % max_ind_range``, empty fields 0.
"""
import gzip
import io
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dlrm_bench import backends, cli, config, criteo, report, verify
from dlrm_bench.config import mpi_available
from dlrm_cli_check import assert_rejected

M = 50  # --max-ind-range

# Line 1 holds the awkward values, each at a known position.
AWKWARD_INTS = ["0", "", "-1", "-3", "1", "5", "123456789", "4294967296", "", "7", "2", "30", "1000"]
AWKWARD_CATS = ["68fd1e64", "", "ABCDEF01", "abcdef01", "1FFFFFFFFF", "ffffffffffffffff", "0", "0000002a"]


def random_fields(rng):
    """13 integer and 26 categorical fields: some empty, some negative, hex in either case."""
    ints = ["" if rng.random() < 0.15 else str(int(rng.integers(-3, 10 ** 6))) for _ in range(13)]
    cats = []
    for _ in range(26):
        if rng.random() < 0.15:
            cats.append("")
        else:
            h = format(int(rng.integers(0, 2 ** 40)), "x")
            cats.append(h.upper() if rng.random() < 0.5 else h)
    return ints, cats


def sample_lines(n=12, seed=5):
    """``n`` lines as (label, ints, cats, line ending); line 1 awkward, line 2 all empty, line 3 CRLF."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints, cats = random_fields(rng)
        ending = "\n"
        if i == 0:
            ints, cats = AWKWARD_INTS, AWKWARD_CATS + cats[len(AWKWARD_CATS):]
        elif i == 1:
            ints, cats = [""] * 13, [""] * 26
        elif i == 2:
            cats[-1], ending = "", "\r\n"  # a stray "\r" would be a bad last field
        lines.append((str(int(rng.integers(0, 2))), ints, cats, ending))
    return lines


def write_criteo(path, lines):
    with open(path, "w", newline="") as f:
        for label, ints, cats, ending in lines:
            f.write("\t".join([label, *ints, *cats]) + ending)
    return path


def expected_dense(text):
    x = max(int(text), 0) if text else 0
    return np.log(np.float32(x) + np.float32(1))


def expected_index(text):
    return int(text, 16) % M if text else 0


def expected_arrays(lines):
    labels = np.array([float(label) for label, _, _, _ in lines], dtype=np.float32)
    dense = np.array([[expected_dense(x) for x in ints] for _, ints, _, _ in lines], dtype=np.float32)
    sparse = np.array([[expected_index(h) for h in cats] for _, _, cats, _ in lines], dtype=np.int64)
    return labels, dense, sparse


@pytest.fixture
def criteo_file(tmp_path):
    lines = sample_lines()
    return write_criteo(tmp_path / "train.txt", lines), lines


# ---------------------------------------------------------------- reader


def test_read_follows_the_reference_preprocessing(criteo_file):
    """Labels, log(x + 1) of clamped integers and hashed categoricals of every line, empties 0."""
    path, lines = criteo_file
    labels, dense, sparse = criteo.read(path, len(lines), M)
    want_labels, want_dense, want_sparse = expected_arrays(lines)
    assert dense.dtype == np.float32 and sparse.dtype == np.int64
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(dense, want_dense, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(sparse, want_sparse)
    assert criteo.count_samples(path) == len(lines)


def test_integers_are_transformed_bit_for_bit_as_the_reference_does():
    """The reference's ``torch.log(torch.tensor(X_int, dtype=torch.float) + 1)``, not numpy's log,
    which differs in the last bit for common values (36, 48 and 178 among them)."""
    import torch
    x = np.arange(-3, 200_000)
    line = lambda ints: "\t".join(["1", *map(str, ints), *["ab"] * 26]) + "\n"
    reference = torch.log(torch.tensor(np.maximum(x, 0), dtype=torch.float) + 1).numpy()
    np.testing.assert_array_equal(criteo.dense_features(x), reference)
    np.testing.assert_array_equal(criteo.parse_line(line([36, 48, 178] + [0] * 10), M, 1)[1],
                                  reference[[39, 51, 181] + [3] * 10])


def test_awkward_values_by_hand(criteo_file):
    """Line 1 and the all-empty line 2, against values worked out by hand."""
    path, lines = criteo_file
    _, dense, sparse = criteo.read(path, 2, M)
    assert list(dense[0, :4]) == [0.0, 0.0, 0.0, 0.0]           # 0, empty, -1, -3
    assert dense[0, 4] == pytest.approx(np.log(2.0), rel=1e-6)     # 1
    assert dense[0, 7] == pytest.approx(np.log(2.0 ** 32 + 1), rel=1e-6)
    # 68fd1e64, empty, ABCDEF01 and abcdef01 (2882400001), 2**37 - 1, 2**64 - 1, 0, 0x2a
    assert list(sparse[0, :8]) == [2, 0, 1, 1, 21, 15, 0, 42]
    assert not dense[1].any() and not sparse[1].any()


def test_parse_line_strips_crlf():
    """A Windows line ending is not part of the last field, even when that field is empty."""
    ints, cats = ["3"] * 13, ["a"] * 25 + [""]
    label, dense, sparse = criteo.parse_line("\t".join(["1", *ints, *cats]) + "\r\n", M, 1)
    assert label == 1 and sparse[-1] == 0 and sparse[0] == 10
    np.testing.assert_allclose(dense, np.full(13, np.log(np.float32(4))), rtol=1e-6)


def _fields():
    return ["0"] + ["1"] * 13 + ["ab"] * 26


BAD_LINES = [
    ("39 fields", "\t".join(_fields()[:-1]), ["39 tab-separated fields", "expected 40"]),
    ("41 fields", "\t".join(_fields() + ["ab"]), ["41 tab-separated fields"]),
    ("spaces for tabs", " ".join(_fields()), ["1 tab-separated fields"]),
    ("non-hex categorical", "\t".join(_fields()[:20] + ["12g4"] + _fields()[21:]),
     ["categorical feature C7 (field 21) '12g4' is not hexadecimal"]),
    ("decimal integer", "\t".join(_fields()[:3] + ["1.5"] + _fields()[4:]),
     ["integer feature I3 (field 4) '1.5' is not an integer"]),
    ("bad label", "\t".join(["x"] + _fields()[1:]), ["the label (field 1) 'x' is not an integer"]),
    # A raw OverflowError past float's range; beyond float32's, stored as inf.
    ("label past 32 bits", "\t".join(["1" + "0" * 400] + _fields()[1:]), ["the label (field 1) '1000", "out of range"]),
    *[(f"integer {bad}", "\t".join(_fields()[:3] + [bad] + _fields()[4:]),  # were 0 or "too large"
       [f"integer feature I3 (field 4) '{bad}' is not an integer"]) for bad in ("--5", "-1__0", "+-5", "_5")],
    ("integer past int()'s digits", "\t".join(_fields()[:3] + ["1" * 5000] + _fields()[4:]),
     ["integer feature I3 (field 4) '11111111111111111111...' is too large for float32"]),
    ("integer past float32", "\t".join(_fields()[:3] + ["1" + "0" * 400] + _fields()[4:]),
     ["too large for float32"]),  # was an OverflowError without the line
    ("integer past float32 only", "\t".join(_fields()[:3] + ["1" + "0" * 39] + _fields()[4:]),
     ["too large for float32"]),  # was inf, and every prediction NaN
]


def test_a_hugely_negative_integer_is_0_as_the_transform_makes_it():
    line = "\t".join(["1", "-" + "9" * 400, "-" + "9" * 39, " -" + "9" * 5000] + ["1"] * 10 + ["ab"] * 26)
    assert list(criteo.parse_line(line, M, 1)[1][:3]) == [0.0, 0.0, 0.0]


def test_read_splits_lines_as_the_parents_count_does(tmp_path):
    """Only at "\\n": a lone "\\r" (CRLF converted twice) is no line end to either
    (the ranks read a line at each, and failed on "line 2" of a file the parent passed)."""
    doubled, clean = tmp_path / "doubled.txt", tmp_path / "clean.txt"
    doubled.write_bytes(("\t".join(_fields()) + "\r\r\n").encode() * 4)
    clean.write_bytes(("\t".join(_fields()) + "\n").encode() * 4)
    assert criteo.count_samples(doubled) == 4
    for got, expected in zip(criteo.read(doubled, 4, M), criteo.read(clean, 4, M)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("line, words", [b[1:] for b in BAD_LINES], ids=[b[0] for b in BAD_LINES])
def test_malformed_line_names_its_line_number(tmp_path, line, words):
    """parse_line and read raise CriteoFormatError naming the line (1-based) and what is wrong."""
    with pytest.raises(criteo.CriteoFormatError, match=r"^line 7: ") as info:
        criteo.parse_line(line + "\n", M, 7)
    for word in words:
        assert word in str(info.value)
    good = ["\t".join(_fields())] * 4
    path = tmp_path / "train.txt"
    path.write_text("\n".join(good[:2] + [line] + good[2:]) + "\n")
    with pytest.raises(criteo.CriteoFormatError, match=rf"^{re.escape(str(path))}: line 3: ") as info:
        criteo.read(path, 5, M)
    for word in words:
        assert word in str(info.value)


OTHER_FORMATS = {
    "gzip": (lambda text: gzip.compress(text), "it is gzip-compressed: decompress it first"),
    "zip": (lambda text: _zipped(text), "it is a zip archive: a processed .npz file is read with "
                                        "--processed-data-file"),
    "lone CR line ends": (lambda text: text.replace(b"\n", b"\r") * 200,
                          "line 1 is longer than 65536 bytes: not the Criteo format (its lines end in a lone CR?)"),
    "a few lone CR line ends": (lambda text: text.replace(b"\n", b"\r"),
                                "line 1: 391 tab-separated fields, expected 40 (its lines end in a lone CR?)"),
}


def _zipped(text):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("train.txt", text)
    return out.getvalue()


@pytest.mark.parametrize("kind", OTHER_FORMATS, ids=OTHER_FORMATS)
def test_a_file_in_another_format_is_refused_saying_which(tmp_path, capsys, kind):
    # Each said "line 1: 2 tab-separated fields" (a lone-CR file after reading it whole).
    make, words = OTHER_FORMATS[kind]
    path = tmp_path / "day_0"
    path.write_bytes(make(("\t".join(_fields()) + "\n").encode() * 10))
    with pytest.raises(criteo.CriteoFormatError, match=re.escape(words)):
        criteo.count_samples(path)
    assert_rejected(capsys, dataset_flags(path), f"--raw-data-file {path}: {words}")


def test_blank_lines_that_end_the_file_end_its_samples(tmp_path):
    # An extra newline at the end refused the whole file once more samples were asked for than it held.
    path, good = tmp_path / "train.txt", "\t".join(_fields()) + "\n"
    path.write_text(good * 12 + "\n\r\n")
    assert criteo.count_samples(path) == 12
    assert config.parse(dataset_flags(path))[0].num_batches == 2
    path.write_text(good * 6 + "\n" + good * 6)
    with pytest.raises(criteo.CriteoFormatError, match="line 7: 1 tab-separated fields"):
        criteo.count_samples(path)


def test_read_wants_enough_lines(criteo_file):
    """Asking for more samples than the file holds is an error, not zeros."""
    path, lines = criteo_file
    with pytest.raises(criteo.CriteoFormatError, match="12 samples, 13 needed"):
        criteo.read(path, 13, M)


# ----------------------------------------------------------------- runs


def dataset_flags(path):
    return ["--data-generation", "dataset", "--raw-data-file", str(path), "--max-ind-range", str(M),
            "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "13-4", "--mini-batch-size", "5",
            "--nprocs", "2", "--lag", "1", "--warmup-batches", "0", "--num-batches", "100",
            "--timeout", "60", "--no-progress"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("backend", ["bls", "gloo", "mpi", "compare"])
def test_a_bad_field_found_by_a_rank_is_one_line_naming_the_file(tmp_path, backend):
    # Only the rank that parses the line finds it, after every rank started.
    # The run printed its message alone, with no file; then the rank's
    # traceback (some 20 lines of our code for a fault of the input), and
    # --compare went on to the next backend, which read the same file.
    if backend == "mpi" and mpi_available() is not None:
        pytest.skip(mpi_available())
    lines = sample_lines()
    path = write_criteo(tmp_path / "train.txt", lines)
    text = path.read_text().splitlines(True)
    fields = text[7].split("\t")
    fields[20] = "zz12"
    text[7] = "\t".join(fields)
    path.write_text("".join(text))
    flags = dataset_flags(path)
    del flags[flags.index("--lag"):flags.index("--lag") + 2]  # bls only
    which = ["--compare"] if backend == "compare" else ["--backend", backend]
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *flags, *which],
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # as for bad flags
    assert "failed" not in proc.stdout, proc.stdout  # --compare tried no other backend
    assert proc.stderr.splitlines()[1:] == [  # after the note that the file holds 2 batches, not 100
        f"dlrm_bench: error: --raw-data-file {path}: line 8: categorical feature C7 (field 21) 'zz12' "
        f"is not hexadecimal"], proc.stderr


def test_dataset_config_uses_whole_batches(criteo_file):
    """12 lines of batch 5: 2 batches (the partial third is dropped), 26 tables of --max-ind-range rows."""
    path, _ = criteo_file
    cfg, _ = config.parse(dataset_flags(path))
    assert cfg.num_batches == 2 and cfg.data_batches == 2
    assert cfg.table_rows == (M,) * 26 and cfg.mlp_bot == (13, 4)


def test_rank_data_is_the_rank_share_of_the_file(criteo_file):
    """A rank gets its tables' rows, one per bag, and its slice of every batch's dense rows."""
    path, lines = criteo_file
    cfg, _ = config.parse(dataset_flags(path))
    _, want_dense, want_sparse = expected_arrays(lines)
    got = criteo.rank_data(cfg, [0, 7, 25], 3, 5, cfg.num_batches)
    B = cfg.batch_size
    for b in range(cfg.num_batches):
        np.testing.assert_allclose(got.dense[b], want_dense[b * B + 3:b * B + 5], rtol=1e-6, atol=0)
        assert set(got.bags[b]) == {0, 7, 25}
        for t in (0, 7, 25):
            np.testing.assert_array_equal(got.bags[b][t].indices, want_sparse[b * B:(b + 1) * B, t])
            np.testing.assert_array_equal(got.bags[b][t].offsets, np.arange(B + 1))
            # A view of the table's column as read, not a copy per batch (which held them twice).
            assert not got.bags[b][t].indices.flags.owndata


def test_a_rank_parses_only_its_columns_and_rows_and_beats_as_it_reads(criteo_file, monkeypatch):
    path, lines = criteo_file
    labels, dense, sparse = criteo.read(path, 10, M)
    beats = []
    monkeypatch.setattr(criteo, "BEAT_EVERY", 3)
    part_labels, part_dense, part_sparse = criteo.read(path, 10, M, [25, 3], (5, 1, 4), lambda: beats.append(1))
    np.testing.assert_array_equal(part_labels, labels)
    np.testing.assert_array_equal(part_sparse, sparse[:, [25, 3]])
    np.testing.assert_array_equal(part_dense, dense[[1, 2, 3, 6, 7, 8]])
    assert len(beats) == 3  # after lines 3, 6 and 9 of the 10 read
    _, part_dense, _ = criteo.read(path, 12, M, [1], (5, 1, 4))  # and a last partial batch's rows
    np.testing.assert_array_equal(part_dense, criteo.read(path, 12, M)[1][[1, 2, 3, 6, 7, 8, 11]])


@pytest.mark.timeout(120)
def test_distributed_run_on_the_file_matches_single_process_bit_for_bit(criteo_file):
    """Two ranks at lag 1 on the Criteo lines predict exactly what one process recomputes."""
    path, _ = criteo_file
    cfg, _ = config.parse(dataset_flags(path))
    pred = report.predictions(backends.run(cfg, "t"))
    assert pred.shape == (2, 5)
    ref = verify.reference_predictions(cfg)
    assert ref.shape == (2, 5) and ref.std() > 0
    assert verify.compare(pred, ref) == (0, 0.0, 0)


@pytest.mark.timeout(120)
def test_a_run_cut_short_by_the_file_says_so(criteo_file, capsys):
    """--num-batches 100 on a file of 2 batches runs 2, and says why on stderr."""
    path, _ = criteo_file
    assert cli.main(dataset_flags(path)) == 0
    err = capsys.readouterr().err
    assert f"{path} holds 2 whole batches of 5: running 2, not --num-batches 100" in err


@pytest.mark.timeout(120)
def test_an_mpi_rank_that_fails_on_a_bad_line_is_reported_with_its_cause(tmp_path):
    # Only the last lines of mpirun's output were shown: its own words about the abort.
    if config.mpi_available() is not None:
        pytest.skip(config.mpi_available())
    lines = ["\t".join(_fields())] * 10
    lines[7] = "\t".join(_fields()[:3] + ["12x"] + _fields()[4:])
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    flags = dataset_flags(path)
    del flags[flags.index("--lag"):flags.index("--lag") + 2]  # a bls option: refused for mpi
    cfg, _ = config.parse(flags + ["--backend", "mpi"])
    # The rank's own error, as bls and gloo raise it, with its traceback as the cause.
    with pytest.raises(criteo.CriteoFormatError) as info:
        backends.run(cfg, "mpi")
    assert str(info.value).startswith(f"{path}: line 8: integer feature I3 (field 4) '12x'"), str(info.value)
    assert 'criteo.py", line' in str(info.value.__cause__), info.value.__cause__


# ---------------------------------------------------------- rejections


def _without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _short_file(tmp_path, lines):
    return write_criteo(tmp_path / "short.txt", sample_lines(lines))


def _comma_file(tmp_path):
    path = tmp_path / "commas.csv"
    path.write_text("".join(",".join(["1"] * 40) + "\n" for _ in range(12)))
    return path


def _densely_numbered_checkpoint(tmp):
    """A checkpoint as the reference trains it on a raw file: tables of the categories seen."""
    import torch
    path = tmp / "dlrm.pt"
    torch.save({"state_dict": {f"emb_l.{i}.weight": torch.zeros(3, 4) for i in range(26)}}, path)
    return path


REJECTIONS = [
    # The message did not say the reference renumbers categories, nor what to give instead.
    ("a checkpoint of the reference's renumbered tables",
     lambda tmp, path: dataset_flags(path) + ["--load-model", str(_densely_numbered_checkpoint(tmp))],
     ["emb_l.0.weight has shape (3, 4)", f"expected ({M}, 4)", "numbers each table's categories anew",
      "--processed-data-file"]),
    ("no --raw-data-file", lambda tmp, path: _without(dataset_flags(path), "--raw-data-file"),
     ["--raw-data-file"]),
    ("missing file", lambda tmp, path: dataset_flags(tmp / "nowhere.txt"), ["nowhere.txt", "no such file"]),
    ("no --max-ind-range", lambda tmp, path: _without(dataset_flags(path), "--max-ind-range"),
     ["--max-ind-range"]),
    ("fewer samples than a batch", lambda tmp, path: dataset_flags(_short_file(tmp, 4)),
     ["4 samples", "--mini-batch-size of 5"]),
    ("empty file", lambda tmp, path: dataset_flags(_short_file(tmp, 0)), ["0 samples"]),
    ("not the Criteo format", lambda tmp, path: dataset_flags(_comma_file(tmp)),
     ["line 1:", "1 tab-separated fields, expected 40"]),
    # Accepted and silently ignored before: the file gives every bag.
    ("a bag size", lambda tmp, path: dataset_flags(path) + ["--num-indices-per-lookup", "500"],
     ["--num-indices-per-lookup does not apply to --data-generation dataset"]),
    ("fixed bag sizes", lambda tmp, path: dataset_flags(path) + ["--num-indices-per-lookup-fixed"],
     ["--num-indices-per-lookup-fixed does not apply"]),
    ("a zipf exponent", lambda tmp, path: dataset_flags(path) + ["--zipf-alpha", "3"], ["--zipf-alpha does not apply"]),
    ("pooling skew", lambda tmp, path: dataset_flags(path) + ["--pooling-skew", "2"], ["--pooling-skew does not apply"]),
    ("pooling drift", lambda tmp, path: dataset_flags(path) + ["--pooling-drift", "1"], ["--pooling-drift does not apply"]),
    ("bottom MLP not on 13 features", lambda tmp, path: dataset_flags(path) + ["--arch-mlp-bot", "12-4"],
     ["--arch-mlp-bot", "13"]),
]


@pytest.mark.parametrize("argv, words", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_cli_rejects_bad_dataset_flags(tmp_path, capsys, no_dlrm_runs, criteo_file, argv, words):
    """Exit 2 and one line on stderr naming the problem, before any process starts."""
    assert_rejected(capsys, argv(tmp_path, criteo_file[0]), *words)
