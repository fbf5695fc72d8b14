"""--load-model: a checkpoint in the reference DLRM layout drives the predictions.

The checkpoint is made here with plain torch, in the layout of
facebookresearch/dlrm ``dlrm_s_pytorch.py`` (``emb_l.<i>.weight``, and
``nn.Sequential`` MLPs whose ``Linear`` layers sit at even indices), and the
predictions of a distributed run are compared with a forward pass written
here from the DLRM definition, not with ``dlrm_bench.model``.
"""

import argparse
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrm_bench import backends, config, data, report
from dlrm_cli_check import assert_rejected
from dlrm_reference import random_state_dict

ROWS = (7, 13, 50, 3, 29)
D = 4
BOT = (3, 8, 4)
NUM_FEATURES = len(ROWS) + 1                                  # bottom output + one per table
TOP = (D + NUM_FEATURES * (NUM_FEATURES - 1) // 2, 6, 1)      # 19-6-1
# The reference's interaction flags, and the top MLP's input width each gives (its num_int).
INTERACTIONS = {
    "dot": ([], TOP[0]),
    "dot itself": (["--arch-interaction-itself"], D + NUM_FEATURES * (NUM_FEATURES + 1) // 2),  # 25
    "cat": (["--arch-interaction-op", "cat"], NUM_FEATURES * D),                              # 24
}


def dashed(sizes):
    return "-".join(map(str, sizes))


def model_flags(path):
    return ["--arch-embedding-size", dashed(ROWS), "--arch-sparse-feature-size", str(D),
            "--arch-mlp-bot", dashed(BOT), "--arch-mlp-top", dashed(TOP[1:]), "--load-model", str(path)]


RUN_FLAGS = ["--nprocs", "2", "--lag", "1", "--num-batches", "3", "--warmup-batches", "0",
             "--mini-batch-size", "5", "--data-size", "10", "--num-indices-per-lookup", "4",
             "--timeout", "60", "--no-progress"]


def reference_state_dict(seed=2024, top=TOP):
    """Random parameters of this file's model under the reference's names and shapes."""
    return random_state_dict(ROWS, BOT, top, D, seed)


def save_reference_checkpoint(path, sd):
    """What the reference's ``torch.save`` writes: the state_dict and its training figures.

    The reference computes its accuracies and losses with numpy, so they are
    numpy scalars in the file; the optimizer state is SGD's.
    """
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.save({"epoch": 3, "nepochs": 4, "nbatches": 100, "nbatches_test": 10, "iter": 50,
                "state_dict": sd, "train_acc": np.float64(0.5), "train_loss": np.float32(0.69),
                "test_acc": np.float64(0.75), "test_loss": np.float32(0.5),
                "total_loss": 0, "total_accu": 0, "opt_state_dict": sgd.state_dict()}, path)


def independent_forward(sd, cfg, batch, interaction="dot"):
    """Click probabilities of global batch ``batch`` from ``sd``, in float64, written from the DLRM definition.

    ``interaction``: a key of ``INTERACTIONS``.
    """
    p = {k: v.double() for k, v in sd.items()}
    x = torch.from_numpy(data.make_dense(cfg, batch)).double()
    for k in range(len(BOT) - 1):
        x = F.relu(F.linear(x, p[f"bot_l.{2 * k}.weight"], p[f"bot_l.{2 * k}.bias"]))
    features = [x]
    for t in range(len(ROWS)):
        bags = data.make_bags(cfg, t, batch)
        offsets = torch.from_numpy(bags.offsets)
        features.append(F.embedding_bag(torch.from_numpy(bags.indices), p[f"emb_l.{t}.weight"],
                                        offsets[:-1], mode="sum"))
    if interaction == "cat":
        r = torch.cat(features, dim=1)                           # (b, F * d)
    else:
        stacked = torch.stack(features, dim=1)                   # (b, F, d)
        z = torch.bmm(stacked, stacked.transpose(1, 2))          # (b, F, F)
        last = 1 if interaction == "dot itself" else 0           # the diagonal too
        pairs = [z[:, i, j] for i in range(NUM_FEATURES) for j in range(i + last)]
        r = torch.cat([x, torch.stack(pairs, dim=1)], dim=1)     # (b, top input)
    layers = len(TOP) - 1
    for k in range(layers):
        r = F.linear(r, p[f"top_l.{2 * k}.weight"], p[f"top_l.{2 * k}.bias"])
        r = torch.sigmoid(r) if k == layers - 1 else F.relu(r)
    return r.view(-1).numpy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("interaction", list(INTERACTIONS))
def test_checkpoint_gives_the_predictions_of_an_independent_forward(tmp_path, interaction):
    """Two ranks at lag 1 predict what the checkpoint's weights give, batch by batch, cycling the data."""
    flags, width = INTERACTIONS[interaction]
    sd = reference_state_dict(top=(width,) + TOP[1:])
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, sd)
    cfg, _ = config.parse(model_flags(path) + RUN_FLAGS + flags)
    assert cfg.data_batches == 2 and cfg.num_batches == 3  # iteration 2 reuses batch 0

    pred = report.predictions(backends.run(cfg, "test"))

    assert pred.shape == (3, 5) and pred.dtype == np.float32
    expected = np.stack([independent_forward(sd, cfg, i % cfg.data_batches, interaction)
                         for i in range(cfg.num_batches)])
    assert 0.1 < expected.std() and np.all((expected > 1e-3) & (expected < 1 - 1e-3))  # not saturated
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(pred[2], pred[0])


def test_a_checkpoint_of_parameters_loads(tmp_path):
    """A state_dict of nn.Parameters (requires_grad), as dict(model.named_parameters()) gives."""
    sd = reference_state_dict()
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, {k: torch.nn.Parameter(v) for k, v in sd.items()})
    cfg, _ = config.parse(model_flags(path) + RUN_FLAGS)

    pred = report.predictions(backends.run(cfg, "test"))

    expected = np.stack([independent_forward(sd, cfg, i % cfg.data_batches) for i in range(cfg.num_batches)])
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_checkpoint_of_another_float_type_is_computed_in_float32(tmp_path, dtype):
    """As the reference's load_state_dict does: bf16 tables used to fail inside the ranks."""
    sd = {k: v.to(dtype) for k, v in reference_state_dict().items()}
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, sd)
    cfg, _ = config.parse(model_flags(path) + RUN_FLAGS)

    pred = report.predictions(backends.run(cfg, "test"))

    as_float32 = {k: v.float() for k, v in sd.items()}
    expected = np.stack([independent_forward(as_float32, cfg, i % cfg.data_batches) for i in range(cfg.num_batches)])
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)


def test_reference_training_figures_are_accepted(tmp_path):
    """The numpy scalars and optimizer state the reference saves beside the state_dict do not stop loading."""
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, reference_state_dict())
    cfg, _ = config.parse(model_flags(path))
    assert cfg.load_model == str(path)


# ----------------------------------------------------------- rejections


def _set(key, value):
    return lambda sd: sd.update({key: value})


MISFITS = [
    ("a table of other rows", _set("emb_l.2.weight", torch.zeros(51, D)),
     ["emb_l.2.weight", "(51, 4)", "expected (50, 4), from --arch-embedding-size"]),
    # The message blamed what set the rows (--arch-embedding-size) for a width only D sets.
    ("a table of other width", _set("emb_l.0.weight", torch.zeros(7, D + 1)),
     ["emb_l.0.weight", "(7, 5)", f"from --arch-sparse-feature-size {D}", "width, 5, as --arch-sparse-feature-size"]),
    ("a table of other rows and width", _set("emb_l.2.weight", torch.zeros(49, D + 1)),
     ["emb_l.2.weight", "(49, 5)", f"expected (50, 4), from --arch-embedding-size and --arch-sparse-feature-size {D}"]),
    # A width hint for a table that is not a matrix: "give the checkpoint's width, 7".
    ("a table that is not a matrix", _set("emb_l.0.weight", torch.zeros(7)), ["emb_l.0.weight", "(7,)", "from the flags"]),
    ("a table too many", _set("emb_l.5.weight", torch.zeros(9, D)), ["emb_l.5.weight"]),
    ("a table missing", lambda sd: sd.pop("emb_l.4.weight"), ["emb_l.4.weight", "it has 12 entries: bot_l.0.bias"]),
    # The reference's MLPs in DistributedDataParallel: only "has no bot_l.0.weight" was said.
    ("MLPs saved wrapped in DistributedDataParallel",
     lambda sd: sd.update({k.replace("bot_l.", "bot_l.module."): sd.pop(k) for k in list(sd) if k.startswith("bot_l.")}),
     ["has no bot_l.0.weight", "it has bot_l.module.0.weight", "DistributedDataParallel"]),
    ("a bottom layer transposed", lambda sd: sd.update({"bot_l.0.weight": sd["bot_l.0.weight"].t().contiguous()}),
     ["bot_l.0.weight", "(3, 8)", "(8, 3)"]),
    ("a top bias missing", lambda sd: sd.pop("top_l.2.bias"), ["top_l.2.bias"]),
    ("a top layer too many", _set("top_l.4.weight", torch.zeros(1, 1)), ["top_l.4.weight"]),
    # Trained with --arch-interaction-itself: the message blamed the size flags, which cannot fix it.
    ("a top input of another interaction", _set("top_l.0.weight", torch.zeros(6, 25)),
     ["top_l.0.weight", "(6, 25)", "(6, 19)", "--arch-interaction-op and --arch-interaction-itself"]),
    ("an integer table", _set("emb_l.1.weight", torch.zeros(13, D, dtype=torch.int32)),
     ["emb_l.1.weight", "torch.int32", "not floating-point"]),
    # Every prediction came out NaN, and --verify found them equal.
    ("a NaN bottom weight", _set("bot_l.0.weight", torch.full((8, 3), float("nan"))),
     ["bot_l.0.weight", "non-finite values"]),
    ("an infinite top bias", _set("top_l.2.bias", torch.tensor([float("inf")])), ["top_l.2.bias", "non-finite"]),
    ("a float64 top bias beyond float32", _set("top_l.2.bias", torch.tensor([1e300], dtype=torch.float64)),
     ["top_l.2.bias", "non-finite"]),
    # The reference's --weighted-pooling learned; they were ignored, changing every prediction.
    ("learned pooling weights", _set("v_W_l.0", torch.full((7,), 0.01)), ["v_W_l.0", "--weighted-pooling learned"]),
]


@pytest.mark.parametrize("mutate, words", [m[1:] for m in MISFITS], ids=[m[0] for m in MISFITS])
def test_checkpoint_that_does_not_fit_the_flags_is_rejected(tmp_path, capsys, no_dlrm_runs, mutate, words):
    """Shapes that differ from the flags: exit 2, one line naming --load-model and the parameter."""
    sd = reference_state_dict()
    mutate(sd)
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, sd)
    assert_rejected(capsys, model_flags(path) + RUN_FLAGS, "--load-model", *words)


def _write_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "x")


NOT_CHECKPOINTS = [
    ("no state_dict key", lambda path: torch.save({"model": reference_state_dict(), "epoch": 3}, path),
     ["state_dict"]),
    ("a bare state_dict", lambda path: torch.save(reference_state_dict(), path), ["state_dict"]),
    ("a state_dict that is not a dict", lambda path: torch.save({"state_dict": None}, path), []),
    # torch's own messages for these asked to retry with weights_only=False.
    ("a text file", lambda path: path.write_bytes(b"0\t1\t2\n"),
     ["is not a checkpoint torch.save wrote", "it starts with b'0\\t1\\t'"]),
    ("an empty file", lambda path: path.write_bytes(b""), ["is not a checkpoint torch.save wrote", "with b''"]),
    ("a pickle of another class", lambda path: torch.save({"state_dict": {}, "args": argparse.Namespace()}, path),
     ["holds more than tensors and plain data", "Unsupported global: GLOBAL argparse.Namespace was not an "
                                                "allowed global by default"]),
    ("a zip that is not torch's", lambda path: _write_zip(path), ["cannot read it"]),
]


@pytest.mark.parametrize("write, words", [c[1:] for c in NOT_CHECKPOINTS], ids=[c[0] for c in NOT_CHECKPOINTS])
def test_file_that_is_not_a_checkpoint_is_rejected(tmp_path, capsys, no_dlrm_runs, write, words):
    """No ``state_dict`` key, or no torch file at all: exit 2, one line naming --load-model."""
    path = tmp_path / "dlrm.pt"
    write(path)
    assert_rejected(capsys, model_flags(path) + RUN_FLAGS, "--load-model", str(path), *words)


def test_missing_checkpoint_file_is_rejected(tmp_path, capsys, no_dlrm_runs):
    """A path that does not exist: exit 2 before torch reads anything."""
    assert_rejected(capsys, model_flags(tmp_path / "nowhere.pt") + RUN_FLAGS, "--load-model", "no such file")


def test_loading_a_checkpoint_beats_for_each_table(tmp_path):
    """Converting a big bf16 table takes seconds: mpirun's watchdog hears from the rank after each."""
    from dlrm_bench.model import Model
    sd = {k: v.to(torch.bfloat16) for k, v in reference_state_dict().items()}
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, sd)
    cfg, _ = config.parse(model_flags(path) + RUN_FLAGS)
    beats = []
    model = Model.build(cfg, [0, 2], beat=lambda: beats.append(1))
    assert sorted(model.tables) == [0, 2] and len(beats) == 2
    np.testing.assert_array_equal(model.tables[2], sd["emb_l.2.weight"].float().numpy())


@pytest.mark.timeout(180)
def test_nan_predictions_fail_verify_and_identical_runs_still_compare_identical(tmp_path, capsys, monkeypatch):
    # A NaN table made every prediction NaN: --verify called them "bitwise
    # equal" to the recomputation, and --compare (NaN != NaN) called every
    # run, the main one included, different from the main one.
    from dlrm_bench import cli
    monkeypatch.setattr(cli, "mpi_available", lambda: "not in this test")
    sd = reference_state_dict()
    sd["emb_l.2.weight"] = torch.full((ROWS[2], D), float("nan"))
    path = tmp_path / "dlrm.pt"
    save_reference_checkpoint(path, sd)
    assert cli.main(model_flags(path) + RUN_FLAGS + ["--verify", "--compare"]) == 1
    out = capsys.readouterr().out
    assert "predictions: bitwise identical across the 3 runs" in out
    assert out.count("15 predictions bitwise equal, 15 NOT FINITE (NaN or inf: they verify nothing)") == 3

