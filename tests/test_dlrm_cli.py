"""The command line: bad ones get one clear line and exit status 2, no process started; what a
terminal shows (progress bars, failures on lines of their own)."""
import os
import re
import select
import signal
import subprocess
import sys

import pytest

from dlrm_bench.config import build_parser, mpi_available, parse
from dlrm_cli_check import assert_rejected


BAD = [
    (["--arch-sparse-feature-size", "16", "--arch-mlp-bot", "13-32-8"],
     "--arch-sparse-feature-size 16 does not match the last size of --arch-mlp-bot"),
    (["--arch-embedding-size", "10-10-10", "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "3-4",
      "--arch-mlp-top", "10-2"], "must end with 1"),
    (["--arch-mlp-top", "256-0-1"], "--arch-mlp-top must be positive integers"),
    (["--timeout", "1e10"], "--timeout must be at most 1e+06, got 1e+10"),
    (["--delay-prob", "1", "--delay-ms", "1e300"], "--delay-ms must be at most 3.6e+06"),
    (["--slow-rank", "0", "--slow-factor", "1e300"], "--slow-factor must be at most 1e+06"),
    (["--slow-rank", "0"], "--slow-rank needs --slow-factor F > 1"),
    (["--arch-embedding-size", "1000-1000", "--mini-batch-size", "65536", "--lag", "65536"],
     "the bls arenas of --lag 65536, for each of --nprocs 2 take"),
    (["--backend", "nccl"], "unknown backend 'nccl'"),
    (["--arch-embedding-size", ""], "--arch-embedding-size must be dash-separated integers"),
    (["--arch-embedding-size", "1000000-1000000", "--max-ind-range", "1000"],
     "--max-ind-range needs --data-generation dataset"),
    (["--nprocs", "9", "--mini-batch-size", "8"], "--nprocs 9 is more ranks than the 8 samples"),
    (["--data-generation", "dataset", "--raw-data-file", "/nonexistent/train.txt", "--max-ind-range", "10"],
     "no such file"),
    (["--data-generation", "poisson"], "--data-generation must be one of"),
    (["--arch-embedding-size", "10-x-3"], "dash-separated integers"),
    (["--arch-embedding-size", "10-0-3"], "must be positive"),
    (["--lag", "-1"], "--lag must be >= 0"),
    (["--lag", "100000"], "--lag must be at most 65536"),
    (["--delay-prob", "1.5"], "--delay-prob must be in [0, 1]"),
    (["--slow-rank", "2", "--nprocs", "2"], "--slow-rank 2 is not a rank"),
    (["--load-model", "/nonexistent/model.pt"], "no such file"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--nprocs", "two"], "invalid int value"),
    (["--numpy-rand-seed", "-1"], "--numpy-rand-seed must be >= 0"),
    (["--rounds", "3"], "--rounds applies to --compare"),
    (["--compare", "--rounds", "0"], "--rounds must be in 1..100, got 0"),
    (["--order-offset", "1"], "--order-offset applies to --compare"),
    (["--compare", "--order-offset", "-1"], "--order-offset must be >= 0, got -1"),
    # Found only after the whole run, whose figures were then lost in a traceback.
    (["--json", "/nonexistent/run.json"], "--json /nonexistent/run.json: no such directory /nonexistent"),
    (["--save-predictions", "/nonexistent/p.npy"], "--save-predictions /nonexistent/p.npy: no such directory"),
    (["--json", "/"], "--json /: is a directory"),
    (["--save-predictions", "/proc/version"], "--save-predictions /proc/version: cannot write it"),
    # Sizes past any machine's memory: a rank died of a MemoryError naming no flag.
    (["--num-batches", "99999999999999999999"], "the predictions and timings of --num-batches 99999999999999999999 take"),
    (["--num-indices-per-lookup", "100000"], "bags of up to --num-indices-per-lookup 100000 rows take"),
    (["--warmup-batches", "99999999999999999"], "the predictions of --warmup-batches 99999999999999999 take"),
    (["--arch-embedding-size", "99999999999999999999-5"], "the embedding tables (--arch-embedding-size, "),
    (["--arch-mlp-bot", "13-99999999999-64"], "the MLPs (--arch-mlp-bot, --arch-mlp-top), in every rank take"),
    # Accepted, then silently changed nothing.
    (["--delay-ms", "50"], "--delay-prob and --delay-ms go together"),
    # Accepted, then bound to fail: the peers' waits time out.
    (["--delay-prob", "0.5", "--delay-ms", "2500", "--timeout", "2.5"],
     "--delay-ms 2500 is not shorter than --timeout 2.5 s"),
    # MPI's collectives wait for ever, but the stall watchdog stopped the run after a minute.
    (["--backend", "mpi", "--delay-prob", "1", "--delay-ms", "31000", "--timeout", "1"],
     "--delay-ms 31000 is not shorter than --timeout 1 s + 30 s: mpirun's watchdog"),
    (["--delay-prob", "0.5"], "--delay-prob and --delay-ms go together"),
    (["--slow-factor", "5"], "--slow-factor needs --slow-rank R"),
    (["--zipf-alpha", "3"], "--zipf-alpha needs --data-generation zipf"),
    (["--backend", "gloo", "--lag", "7"], "--lag applies to --backend bls (or to the bls runs of --compare)"),
    (["--backend", "gloo", "--bls-pipeline", "fixed"], "--bls-pipeline applies to --backend bls"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, no_dlrm_runs):
    assert_rejected(capsys, argv, message)


@pytest.mark.parametrize("flag", ["--json", "--save-predictions"])
def test_an_output_that_is_a_pipe_with_no_reader_is_refused_not_waited_on(flag, tmp_path, capsys, no_dlrm_runs):
    # Before, opening it to check it was writable blocked until a reader came.
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    assert_rejected(capsys, [flag, str(fifo)], f"{flag} {fifo}: cannot write it")


def test_checking_an_output_through_a_dangling_link_leaves_no_file(tmp_path, capsys, no_dlrm_runs):
    # A missing --load-model is refused after the output check: nothing runs.
    link, target = tmp_path / "run.json", tmp_path / "target.json"
    link.symlink_to(target)
    assert_rejected(capsys, ["--json", str(link), "--load-model", str(tmp_path / "none.pt")], "no such file")
    assert sorted(os.listdir(tmp_path)) == ["run.json"] and not target.exists()


def test_the_top_mlp_flag_means_what_it_means_in_the_reference():
    # dlrm_s_pytorch.py puts the interaction size in front of --arch-mlp-top:
    # its defaults (3 tables of width 2: 4 features, 6 pairs + 2) make 8-4-2-1.
    cfg, _ = parse(["--arch-embedding-size", "4-3-2", "--arch-sparse-feature-size", "2",
                    "--arch-mlp-bot", "4-3-2", "--arch-mlp-top", "4-2-1", "--mini-batch-size", "8"])
    assert cfg.mlp_top == (8, 4, 2, 1)
    default, _ = parse([])
    assert default.mlp_top == (415, 256, 128, 1)  # 26 tables of width 16


@pytest.mark.parametrize("flags, width", [
    ([], 2 + 6),                                                     # D + F(F-1)/2
    (["--arch-interaction-op", "dot"], 2 + 6),
    (["--arch-interaction-itself"], 2 + 10),                         # D + F(F+1)/2
    (["--arch-interaction-op", "cat"], 4 * 2),                       # F x D
    (["--arch-interaction-op", "cat", "--arch-interaction-itself"], 4 * 2),  # ignored, as the reference does
])
def test_the_interaction_flags_of_the_reference_set_the_top_mlp_input(flags, width):
    cfg, _ = parse(["--arch-embedding-size", "4-3-2", "--arch-sparse-feature-size", "2",
                    "--arch-mlp-bot", "4-3-2", "--arch-mlp-top", "4-2-1", "--mini-batch-size", "8"] + flags)
    assert cfg.mlp_top == (width, 4, 2, 1)
    assert cfg.interaction_op == ("cat" if "cat" in flags else "dot")
    assert cfg.interaction_itself == ("--arch-interaction-itself" in flags)


def test_an_unknown_interaction_op_is_refused(capsys, no_dlrm_runs):
    assert_rejected(capsys, ["--arch-interaction-op", "sum"], "--arch-interaction-op", "invalid choice: 'sum'")


def test_an_output_path_through_a_dangling_link_is_refused(tmp_path, capsys, no_dlrm_runs):
    link = tmp_path / "run.json"
    link.symlink_to(tmp_path / "missing" / "run.json")
    assert_rejected(capsys, ["--json", str(link)], f"--json {link}: cannot write it")
    assert link.is_symlink()  # left as it was


def test_an_output_that_is_another_output_or_an_input_is_refused(tmp_path, capsys, no_dlrm_runs):
    # --json over --save-predictions lost the predictions; over an input, the data.
    out = tmp_path / "out"
    assert_rejected(capsys, ["--json", str(out), "--save-predictions", f"{tmp_path}/./out"],
                    f"--json {out} and --save-predictions {tmp_path}/./out are the same file")
    model = tmp_path / "dlrm.pt"
    model.write_bytes(b"weights")
    os.link(model, tmp_path / "link.pt")
    assert_rejected(capsys, ["--load-model", str(model), "--save-predictions", str(tmp_path / "link.pt")],
                    f"--save-predictions {tmp_path}/link.pt and --load-model {model} are the same file")
    assert model.read_bytes() == b"weights" and not out.exists()


def test_the_module_entry_point_exits_2():
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", "--backend", "nccl"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dlrm_bench: error: unknown backend 'nccl': choose one of bls, gloo, mpi"]


def test_help_documents_delays_and_imbalance():
    text = build_parser().format_help()
    for flag in ("--delay-prob", "--delay-ms", "--slow-rank", "--slow-factor", "--compare", "--verify",
                 "--lag", "--zipf-alpha", "--pooling-skew"):
        assert flag in text


def test_non_finite_numbers_are_refused(capsys, no_dlrm_runs):
    assert_rejected(capsys, ["--delay-ms", "nan", "--delay-prob", "0.1"], "--delay-ms must be a finite number")


@pytest.mark.parametrize("data_size, noted", [(8, True), (16, True), (24, False)])
def test_verify_says_when_too_few_distinct_batches_hide_an_iteration_mix_up(capsys, monkeypatch, data_size, noted):
    # With as many distinct batches as lag + 1 or fewer, an iteration given
    # the blocks of one up to lag + 1 before it can predict the same.
    from dlrm_bench import backends, cli

    def stop(*_args, **_kwargs):
        raise RuntimeError("stopped before any rank starts")
    monkeypatch.setattr(backends, "run", stop)
    flags = [f for f in TINY if f != "--compare"] + ["--num-batches", "6", "--lag", "1", "--verify",
                                                     "--data-size", str(data_size)]
    assert cli.main(flags) == 1
    err = capsys.readouterr().err
    note = (f"--verify sees {data_size // 8} distinct batch(es): an iteration given the blocks of one up to 2 "
            f"before it may go unnoticed; --data-size 24 or more makes that visible")
    assert (note in err) == noted and ("--verify sees" in err) == noted


def test_verify_of_a_synchronous_backend_counts_no_lag(capsys, monkeypatch):
    # gloo and mpi have no lag, but the note counted the default --lag 4.
    from dlrm_bench import backends, cli

    def stop(*_args, **_kwargs):
        raise RuntimeError("stopped before any rank starts")
    monkeypatch.setattr(backends, "run", stop)
    flags = [f for f in TINY if f != "--compare"] + ["--num-batches", "6", "--verify", "--backend", "gloo"]
    assert cli.main(flags + ["--data-size", "16"]) == 1
    assert "--verify sees" not in capsys.readouterr().err
    assert cli.main(flags + ["--data-size", "8"]) == 1
    assert "one up to 1 before it may go unnoticed; --data-size 16 or more" in capsys.readouterr().err


PREVIOUS_RUN_JSON = '{"samples_per_s": 1e6, "failed": []}'  # what a successful earlier run left


def test_an_interrupted_run_leaves_no_previous_figures_behind(tmp_path, monkeypatch):
    # A previous run's --json and --save-predictions stayed as they were,
    # with figures this run never made.
    from dlrm_bench import backends, cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(backends, "run", interrupted)
    out, preds = tmp_path / "run.json", tmp_path / "preds.npy"
    out.write_text(PREVIOUS_RUN_JSON)
    preds.write_bytes(b"previous predictions")
    flags = [f for f in TINY if f != "--compare"]
    with pytest.raises(KeyboardInterrupt):
        cli.main(flags + ["--json", str(out), "--save-predictions", str(preds)])
    assert out.read_bytes() == b"" and preds.read_bytes() == b""


TINY = ["--arch-embedding-size", "100-100", "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "13-4",
        "--arch-mlp-top", "1", "--mini-batch-size", "8", "--num-batches", "4", "--warmup-batches", "1",
        "--no-progress", "--compare"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("main", ["bls", "gloo"])
def test_a_failed_compare_run_fails_the_command_and_keeps_the_other_figures(tmp_path, main):
    # A failed gloo run gave exit status 0; and when it was the --backend run,
    # the others' table and JSON were thrown away.
    import json
    out = tmp_path / "runs.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="no-such-interface0")  # gloo cannot start
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *TINY, "--backend", main, "--json", str(out)],
                          capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gloo: failed:" in proc.stdout and "bls lag 0 " in proc.stdout  # the table's row
    runs = {r["label"]: r for r in json.loads(out.read_text())["runs"]}
    assert "error" in runs["gloo"] and runs["bls lag 0"]["samples_per_s"] > 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags, line", [
    (["--backend", "gloo", "--lag", "1"], r"\ngloo: [0-9.]+x bls lag 0, [0-9.]+x bls lag 1[,;]"),
    (["--lag", "0"], r"\nbls lag 0: [0-9.]+x gloo[,;]")])
def test_the_compare_summary_sets_the_main_run_against_every_other(flags, line):
    # It named bls lag 0, gloo and MPI only: --backend gloo left out bls lag 1,
    # and with --lag 0 (bls lag 0 the main run) there was no summary at all.
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *TINY, *flags], capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(line, proc.stdout), proc.stdout


@pytest.mark.timeout(240)
def test_output_piped_to_a_reader_that_leaves_ends_the_run_quietly_of_sigpipe():
    # `dlrm_bench ... | head -1` ended in a BrokenPipeError traceback.
    proc = subprocess.Popen([sys.executable, "-m", "dlrm_bench", *TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("dlrm_bench: 2 ranks")
        proc.stdout.close()  # as head does after its line
        _, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGPIPE and "Traceback" not in err, err


@pytest.mark.timeout(240)
def test_compare_rounds_rotate_the_order_and_pair_the_ratios_by_round(tmp_path):
    # One pass in a fixed order let a slow phase of the machine fall on one
    # backend: lag 4 once measured 0.37x lag 0, its compute 2.9x slower.
    # --order-offset 1 begins one order later (tools/dlrm_report.py's
    # repeats ran every backend in the same order).
    import json
    out = tmp_path / "runs.json"
    flags = [f for f in TINY if f != "--backend"] + ["--lag", "1", "--rounds", "2", "--order-offset", "1",
                                                     "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *flags], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    labels = ["bls lag 0", "bls lag 1", "gloo"] + (["mpi"] if mpi_available() is None else [])
    order = [(r["label"], r["round"]) for r in doc["runs"]]
    from dlrm_bench.cli import round_order
    assert order == ([(label, 1) for label in round_order(labels, 1)]
                     + [(label, 2) for label in round_order(labels, 2)])
    assert round_order(labels, 1) != labels and round_order(labels, 2) != round_order(labels, 1)
    assert doc["rounds"] == 2 and doc["run"] == "bls lag 1"
    for label in labels[:1] + labels[2:]:
        mine = {r["round"]: r["samples_per_s"] for r in doc["runs"] if r["label"] == "bls lag 1"}
        theirs = {r["round"]: r["samples_per_s"] for r in doc["runs"] if r["label"] == label}
        per_round = [mine[k] / theirs[k] for k in (1, 2)]
        ratio = doc["ratios"][label]
        assert ratio["rounds"] == 2 and ratio["min"] == min(per_round) and ratio["max"] == max(per_round)
        assert ratio["median"] == pytest.approx(sum(per_round) / 2)
    # The main run's figures are its lower median round's (of two: the slower).
    assert doc["samples_per_s"] == min(mine.values())
    assert "over 2 rounds" in proc.stdout and f"bitwise identical across the {2 * len(labels)} runs" in proc.stdout


@pytest.mark.timeout(240)
def test_a_run_that_failed_in_one_round_is_named_and_its_ratios_say_over_how_many(tmp_path, monkeypatch, capsys):
    import json
    from dlrm_bench import backends, cli
    real_run, calls = backends.run, []

    def gloo_fails_in_round_2(cfg, label):
        calls.append(label)
        if label == "gloo" and calls.count("gloo") == 2:
            raise RuntimeError("gloo lost a peer")
        return real_run(cfg, label)
    monkeypatch.setattr(backends, "run", gloo_fails_in_round_2)
    out = tmp_path / "runs.json"
    flags = [f for f in TINY if f != "--backend"] + ["--lag", "1", "--rounds", "2", "--json", str(out)]
    assert cli.main(flags) == 1  # a failed run fails the command
    printed = capsys.readouterr().out
    assert re.search(r"\ngloo +failed: RuntimeError: gloo lost a peer \(round 2\)\n", printed), printed
    assert re.search(r"bls lag 1: .*x gloo \(1 of 2 rounds\)", printed), printed
    doc = json.loads(out.read_text())
    assert doc["ratios"]["gloo"]["rounds"] == 1 and doc["ratios"]["bls lag 0"]["rounds"] == 2
    assert doc["failed"] == ["gloo"] and doc["samples_per_s"] > 0
    # The table's "vs gloo" is paired by round too: the one round gloo ran.
    mine, gloo = ({r["round"]: r for r in doc["runs"] if r["label"] == label} for label in ("bls lag 1", "gloo"))
    vs_gloo = re.search(r"\nbls lag 1 .* ([0-9.]+)x\n", printed).group(1)
    assert vs_gloo == f"{mine[1]['samples_per_s'] / gloo[1]['samples_per_s']:.2f}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["bls", "gloo"])
def test_timeout_bounds_the_run_and_not_a_slow_rank_setup(backend):
    # Rank 0 spends seconds building a 24M-row table (4-8 s here) while rank 1,
    # with a 10-row table, is ready at once: it used to time out waiting for rank 0.
    big = ["--arch-embedding-size", "24000000-10", "--arch-sparse-feature-size", "16",
           "--arch-mlp-bot", "13-16", "--arch-mlp-top", "1", "--mini-batch-size", "64",
           "--num-batches", "20", "--warmup-batches", "2", "--no-progress", "--timeout", "2"]
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *big, "--backend", backend],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " samples/s in " in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["bls", "gloo"])
def test_a_timeout_names_the_batch_and_the_flag(backend, tmp_path):
    # It said "complete(23) timed out ..." (blsshm's count: barriers and warm-up
    # included) or gloo's "Timed out waiting 1000ms for send operation".
    import json
    slow = ["--arch-embedding-size", "1000-1000", "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "13-4",
            "--arch-mlp-top", "1", "--mini-batch-size", "8", "--num-batches", "20", "--warmup-batches", "2",
            "--no-progress", "--timeout", "1", "--slow-rank", "1", "--slow-factor", "1e6"]
    out = tmp_path / "run.json"
    out.write_text(PREVIOUS_RUN_JSON)  # must not pass for this run's
    proc = subprocess.run([sys.executable, "-m", "dlrm_bench", *slow, "--backend", backend, "--json", str(out)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"failed: TimeoutError: in timed batch \d+ of 20, a wait took longer than --timeout 1 s: ",
                     proc.stderr), proc.stderr
    # Where it happened: the rank's traceback (it printed only the message).
    assert re.search(r"the failing rank's traceback:\nTraceback \(most recent call last\):\n(.*\n)*"
                     r".*worker\.py", proc.stderr), proc.stderr
    doc = json.loads(out.read_text())
    label = "bls lag 4" if backend == "bls" else "gloo"  # lag 4 by default
    assert doc["run"] == label and doc["failed"] == [label] and "samples_per_s" not in doc
    assert [r["label"] for r in doc["runs"]] == [label]
    assert doc["runs"][0]["error"].startswith("failed: TimeoutError: in timed batch ")


def _run_on_a_terminal(cmd, signal_at_bar=None):
    """Run ``cmd`` with stderr on a pty; (returncode, stdout, stderr).

    With ``signal_at_bar`` that signal is sent to it once a progress bar shows.
    """
    master, slave = os.openpty()
    proc = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = None
        err = b""
        while True:  # drain the terminal as the run writes (a full one would block it)
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every writer closed it
                    break
                if not chunk:
                    break
                err += chunk
                if signal_at_bar is not None and b" batches " in err:
                    proc.send_signal(signal_at_bar)
                    signal_at_bar = None
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
        if proc is not None and proc.returncode is None:  # the test failed before communicate() ended
            proc.terminate()  # let it clean up: SIGKILL would leave MPI's segments
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.communicate()
    return proc.returncode, out, err.decode(errors="replace")


PROGRESS_RUN = [f for f in TINY if f not in ("--no-progress", "--compare")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["bls", "gloo", "mpi"])
def test_every_backend_draws_a_progress_bar_on_a_terminal(backend):
    # mpirun captures its ranks' stderr: an MPI run showed no bar at all.
    if backend == "mpi" and mpi_available() is not None:
        pytest.skip(mpi_available())
    lag = ["--lag", "2"] if backend == "bls" else []
    code, out, err = _run_on_a_terminal([sys.executable, "-m", "dlrm_bench", *PROGRESS_RUN,
                                         "--num-batches", "400", "--backend", backend, *lag])
    assert code == 0, out + err
    label = "bls lag 2" if backend == "bls" else backend
    assert f"\r  {label} [" in err and "400/400 batches" in err, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["bls", "mpi"])
def test_an_interrupted_run_says_so_on_a_line_of_its_own(backend):
    # It was written after the unfinished bar, on the same line.
    if backend == "mpi" and mpi_available() is not None:
        pytest.skip(mpi_available())
    code, out, err = _run_on_a_terminal([sys.executable, "-m", "dlrm_bench", *PROGRESS_RUN,
                                         "--num-batches", "1000000", "--backend", backend],
                                        signal_at_bar=signal.SIGTERM)
    assert code == -signal.SIGTERM, out + err
    assert " batches " in err and "\ndlrm_bench: interrupted by SIGTERM" in err.replace("\r\n", "\n"), err


def test_a_lag_whose_arenas_dev_shm_cannot_hold_is_refused(monkeypatch, capsys):
    """/dev/shm may hold less than the memory (a container's 64 MiB): its free room is checked too."""
    import os
    from collections import namedtuple
    from dlrm_bench import config
    small = namedtuple("statvfs", "f_bavail f_frsize")(16, 1 << 20)  # 16 MiB free
    monkeypatch.setattr(config.os, "statvfs", lambda path: small if path == config.SHM_DIR else os.statvfs(path))
    assert_rejected(capsys, ["--lag", "64", "--mini-batch-size", "1024"],
                    "--lag 64: the bls arenas", "which has 16 MiB free")
