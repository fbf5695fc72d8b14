"""One rank of the benchmark: its tables, its data and the inference loop.

Per iteration (one global batch) a rank

1. pools the bags of its own tables for the whole global batch, straight
   into its outgoing blocks laid out by destination (block ``q`` is
   ``(b_q, own tables, d)`` float32, the samples rank ``q`` serves);
2. starts the exchange of the blocks (the alltoallv);
3. runs the bottom MLP on its own slice of the dense features while its
   peers' blocks arrive;
4. waits for them, gathers the blocks it received into ``(b, tables, d)``
   in global table order, runs the interaction and the top MLP: its
   slice's predictions.

With ``--backend bls`` the exchange is a bounded-lag pipeline:
``post(t)`` (the lookup writes into blsshm's zero-copy send views), then
every complete that can go without waiting, or ``complete(t - L)`` at the
latest (see ``Rank.run_bls``).  The other backends run the same
steps with their nonblocking synchronous alltoallv (``Ialltoallv``,
``all_to_all_single(async_op=True)``), so every backend overlaps the
bottom MLP with waiting for its peers.

Every timed iteration is recorded: when it started, how long this rank
computed for it and slept in injected delays, and when its predictions
were out.  Times are ``time.perf_counter()``, one clock for all the
processes of the machine.
"""
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

from dlrm_bench._pooling import pool_sum
from dlrm_bench.data import load_rank_data
from dlrm_bench.model import Model
from dlrm_bench.sharding import make_plan

DELAY_STREAM = 21
PROGRESS_EVERY_S = 0.25
SETUP_TIMEOUT_S = 24 * 3600  # rank setup has no timeout of its own (see gloo_rank)

now = time.perf_counter
cpu_now = time.thread_time  # 0.7 us a call: taken only around compute, only when timed


def _sleep(seconds):
    """Sleep and return the time actually slept; skips zero (sleep(0) costs ~90 us here)."""
    if seconds <= 0:
        return 0.0
    t0 = now()
    time.sleep(seconds)
    return now() - t0


class Record:
    """Per-iteration timings of one rank's timed loop."""

    def __init__(self, n):
        self.start = np.zeros(n)
        self.finish = np.zeros(n)
        self.compute = np.zeros(n)
        self.delay = np.zeros(n)
        # The same work split where the exchange divides it (see report.lag_bound):
        # before this rank publishes t, between publishing and receiving,
        # after receiving, and a slow rank's extra sleep at the end of step t.
        self.before = np.zeros(n)
        self.between = np.zeros(n)
        self.after = np.zeros(n)
        self.slow = np.zeros(n)
        self.slow_asked = np.zeros(n + 1)  # the slow sleeps asked, after each step and the drain
        self.held = np.zeros(n)  # the part of `after` inside complete, peers' buffers held (see replay)
        self.drain_slow = 0.0  # a slow rank's sleep after the bls loop's drain (in slow[-1] too)
        self.phases = dict.fromkeys(("lookup", "bottom", "gather", "top"), 0.0)  # seconds in each step
        self.cpu = 0.0  # CPU seconds of this rank's thread while computing
        # bls: seconds inside the exchange's calls (entering and leaving
        # post_views and complete_views, with their waits, and arrived), as
        # gloo's and MPI's time inside their collective's calls; not compute.
        self.exchange = 0.0

    def as_dict(self):
        return {"start": self.start, "finish": self.finish, "compute": self.compute, "delay": self.delay,
                "before": self.before, "between": self.between, "after": self.after, "slow": self.slow,
                "held": self.held, "drain_slow": self.drain_slow, "slow_asked": self.slow_asked,
                "phases": self.phases, "cpu_compute": self.cpu}


class Heartbeat:
    """Touches ``path`` (at most every ``PROGRESS_EVERY_S``) when called: a sign of progress.

    mpirun's parent watches it, since MPI's collectives have no timeout of
    their own (see ``backends.run_mpi``).  Without a path it does nothing.
    """

    def __init__(self, path=None):
        self.path = path
        self.last = -math.inf

    def __call__(self):
        if self.path is None:
            return
        t = now()
        if t - self.last >= PROGRESS_EVERY_S:
            self.last = t
            with open(self.path, "a"):
                os.utime(self.path)


class Progress:
    """Rank 0's progress bar, drawn on stderr when the parent is on a terminal.

    Its state also goes to the file ``relay`` (see :class:`RelayedProgress`):
    the parent draws from it when it alone has the terminal (an MPI rank's
    stderr is mpirun's, which the parent captures; ``draw`` False), and
    ends a bar left unfinished before it prints why.  Every update, drawn or
    not, calls ``heartbeat`` (if any).
    """

    def __init__(self, enabled, label, total, batch_size, relay=None, draw=True, heartbeat=None):
        self.enabled, self.label, self.total, self.batch_size = enabled, label, total, batch_size
        self.relay, self.draw, self.heartbeat = relay, draw, heartbeat
        self.t0 = self.last = now()

    def update(self, done):
        if self.heartbeat is not None:
            self.heartbeat()
        if not self.enabled:
            return
        t = now()
        if t - self.last < PROGRESS_EVERY_S and done < self.total:
            return
        self.last = t
        if self.relay is not None:  # first: a bar on the terminal is always one the parent knows of
            part = self.relay + ".part"
            with open(part, "w") as f:
                f.write(f"{done} {t - self.t0!r}\n")
            os.replace(part, self.relay)  # whole: the parent never reads half a state
        if self.draw:
            draw_progress(self.label, done, self.total, self.batch_size, t - self.t0)


def draw_progress(label, done, total, batch_size, elapsed):
    """Draw the bar on stderr (over the last one); end the line once ``done`` reaches ``total``."""
    width = 30
    filled = width * done // total
    rate = done * batch_size / max(elapsed, 1e-9)
    sys.stderr.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total} batches  {rate:,.0f} samples/s")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class RelayedProgress:
    """The parent's side of a :class:`Progress`: the state rank 0 last wrote to ``path``."""

    def __init__(self, path, label, total, batch_size):
        self.path, self.label, self.total, self.batch_size = path, label, total, batch_size
        self.drawn = -1

    def _read(self):
        try:
            with open(self.path) as f:
                done, elapsed = f.read().split()
            return int(done), float(elapsed)
        except (OSError, ValueError):
            return None  # not written yet

    def poll(self):
        """Draw the state if it changed since the last call."""
        state = self._read()
        if state is not None and state[0] != self.drawn:
            self.drawn = state[0]
            draw_progress(self.label, state[0], self.total, self.batch_size, state[1])

    def close(self):
        """End the line of a bar the run left unfinished, so that what follows starts a line of its own."""
        state = self._read()
        if state is not None and state[0] < self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Rank:
    """A rank's share of model and data, and the steps of an iteration."""

    def __init__(self, cfg, rank, beat=None):
        """``beat`` (if given) is called now and then while the model and data are made or read."""
        torch.set_num_threads(1)  # ranks share the cores; intra-op threads would oversubscribe
        self.cfg, self.rank = cfg, rank
        self.plan = plan = make_plan(cfg)
        self.nprocs = plan.nprocs
        self.own_tables = plan.tables[rank]
        self.lo, self.hi = plan.slices[rank]
        self.b = self.hi - self.lo
        d, P = cfg.sparse_size, self.nprocs
        self.d = d
        self.model = Model.build(cfg, self.own_tables, beat)
        self.data = load_rank_data(cfg, self.own_tables, self.lo, self.hi, cfg.data_batches, beat)
        width = len(self.own_tables) * d
        self.send_counts = np.array([plan.batch_size(q) * width for q in range(P)], dtype=np.int64)
        self.recv_counts = np.array([self.b * len(plan.tables[s]) * d for s in range(P)], dtype=np.int64)
        self.recv_positions = [1 + np.array(plan.tables[s], dtype=np.int64) for s in range(P)]
        # bottom output and pooled embeddings side by side, as the interaction wants them
        self.stacked = np.empty((self.b, 1 + len(cfg.table_rows), d), dtype=np.float32)
        rng = np.random.default_rng([cfg.seed, DELAY_STREAM, rank])
        self.delayed = rng.random(cfg.num_batches) < cfg.delay_prob
        self.slow = rank == cfg.slow_rank and cfg.slow_factor > 1.0
        # Injected sleep asked for and not yet slept (< 0: overslept), per kind.
        self.sleep_owed = {"delay": 0.0, "slow": 0.0}
        self.at = ("setup", 0, 0)  # where the loops are: (stage, batch index, batches), for errors

    # ------------------------------------------------------------- steps

    def lookup(self, batch, blocks):
        """Pool this rank's tables for every sample of ``batch`` into ``blocks[q]`` (``(b_q, width)``)."""
        bags = self.data.bags[batch % self.data.num_batches]
        d = self.d
        for q, out in enumerate(blocks):
            first = self.plan.slices[q][0]
            for j, t in enumerate(self.own_tables):
                pool_sum(self.model.tables[t], bags[t].indices, bags[t].offsets, first, out, j * d)

    def bottom(self, batch):
        with torch.inference_mode():
            return self.model.dense.bottom(torch.from_numpy(self.data.dense[batch % self.data.num_batches]))

    def gather(self, blocks):
        """Place the received ``blocks[s]`` (flat, ``(b, tables of s, d)``) in global table order."""
        for s, block in enumerate(blocks):
            positions = self.recv_positions[s]
            if len(positions):
                self.stacked[:, positions, :] = block.reshape(self.b, len(positions), self.d)

    def top(self, x):
        self.stacked[:, 0, :] = x.numpy()
        with torch.inference_mode():
            return self.model.dense.top_stacked(torch.from_numpy(self.stacked)).numpy().copy()

    def outgoing(self, flat_blocks):
        """Flat per-destination blocks as ``(b_q, width)`` arrays for the kernel."""
        return [block.reshape(self.plan.batch_size(q), -1) for q, block in enumerate(flat_blocks)]

    def injected_delay(self, i):
        return self.inject(self.cfg.delay_ms / 1e3 if self.delayed[i] else 0.0, "delay")

    def slow_sleep(self, rec, i, step_cpu):
        """A slow rank's extra time after step ``i`` (``i = n``: the drain) of ``step_cpu`` CPU seconds.

        CPU time, not wall time: on shared cores a step's wall time holds
        its wait for a core, which differs from backend to backend.  The
        CPU time differs too (another backend's threads share the caches:
        1.6 times bls's under gloo, measured), so the runs of a --compare
        after the first sleep what the first asked (``cfg.slow_steps_s``):
        every backend gets the same delays.
        """
        replayed = self.cfg.slow_steps_s
        if replayed:
            if len(replayed) != len(rec.slow_asked):
                raise ValueError(f"{len(replayed)} slow sleeps to repeat for {len(rec.slow_asked)} steps")
            seconds = replayed[i]
        else:
            seconds = (self.cfg.slow_factor - 1.0) * step_cpu
        rec.slow_asked[i] = seconds
        return self.inject(seconds, "slow")

    def inject(self, seconds, kind):
        """Sleep ``seconds`` of injected delay of ``kind``, less what earlier sleeps of that kind
        overslept; return the time slept.

        A sleep on a busy machine wakes late (5 ms took 10.8 here), more
        under one backend than another: paid back, every backend's run
        sleeps what was asked in all, give or take one sleep's overshoot.
        Each kind pays back its own: the slow rank's short sleeps overshoot
        most, and paid back from the random delays they cut those spikes
        (5 ms slept as 1.1), differently in every backend.
        """
        self.sleep_owed[kind] += seconds
        if seconds <= 0 or self.sleep_owed[kind] <= 0:
            return 0.0
        slept = _sleep(self.sleep_owed[kind])
        self.sleep_owed[kind] -= slept
        return slept

    # ------------------------------------------------------------ loops

    def run_bls(self, comm, batches, rec, progress):
        """The bounded-lag pipeline: post(t), then complete what has arrived; drain at the end.

        ``eager`` (default) completes every iteration whose blocks have all
        arrived (``comm.arrived``, never waiting) and waits only for the
        oldest once ``L`` are outstanding.  A rank then holds its peers'
        buffers no longer than needed, so a fast rank can post up to ``L + 1``
        iterations ahead of a stalled one.  ``fixed`` is DESIGN §2's
        ``post(t); complete(t - L)``: every iteration is held ``L`` steps, so
        all ``L + 1`` buffers are always in use and a fast rank can get only
        one step ahead (post(t) needs everyone to have completed
        ``t - L - 1``, which the pipeline does in step ``t - 1``).
        """
        L, base = comm.lag, comm.next_post
        eager = self.cfg.bls_pipeline == "eager"
        timed = rec is not None
        stage = "timed" if timed else "warm-up"
        pending = {}  # iteration -> bottom output, until its blocks arrive
        preds = np.empty((len(batches), self.b), dtype=np.float32)
        step_cpu = 0.0  # CPU seconds of the current step (timed runs only)
        done = 0  # iterations completed

        def arrived(t):
            if not timed:
                return comm.arrived(t)
            a = now()
            yes = comm.arrived(t)
            rec.exchange += now() - a
            return yes

        def finish(j):
            nonlocal step_cpu
            self.at = (stage, j, len(batches))  # a wait here is for batch j's blocks
            e0 = now()
            with comm.complete_views(base + j) as views:
                c0, p0 = now(), cpu_now() if timed else 0.0
                self.gather(views)
                c1, p1 = now(), cpu_now() if timed else 0.0
            c1x, p1x = now(), cpu_now() if timed else 0.0  # released: exchange, not compute
            preds[j] = self.top(pending.pop(j))
            c2 = now()
            if timed:
                cpu = (p1 - p0) + (cpu_now() - p1x)
                rec.cpu += cpu
                step_cpu += cpu
                rec.compute[j] += (c1 - c0) + (c2 - c1x)
                rec.after[j] += (c1 - c0) + (c2 - c1x)
                rec.held[j] += c1 - c0
                rec.finish[j] = c2
                rec.exchange += (c0 - e0) + (c1x - c1)
                rec.phases["gather"] += c1 - c0
                rec.phases["top"] += c2 - c1x
            progress.update(j + 1)

        for i, batch in enumerate(batches):
            self.at = (stage, i, len(batches))
            step_cpu = 0.0
            if timed:
                rec.start[i] = now()
                injected = self.injected_delay(i)
                rec.delay[i] += injected
                rec.before[i] += injected
            e0 = now()
            with comm.post_views(base + i, self.send_counts, np.float32) as views:
                c0, p0 = now(), cpu_now() if timed else 0.0
                self.lookup(batch, self.outgoing(views))
                c1, p1 = now(), cpu_now() if timed else 0.0
            c1x, p1x = now(), cpu_now() if timed else 0.0  # published: exchange, not compute
            pending[i] = self.bottom(batch)  # after publishing: peers need our blocks first
            c2 = now()
            if timed:
                cpu = (p1 - p0) + (cpu_now() - p1x)
                rec.cpu += cpu
                step_cpu += cpu
                rec.compute[i] += (c1 - c0) + (c2 - c1x)
                rec.before[i] += c1 - c0
                rec.between[i] += c2 - c1x
                rec.exchange += (c0 - e0) + (c1x - c1)
                rec.phases["lookup"] += c1 - c0
                rec.phases["bottom"] += c2 - c1x
            while done <= i and (i - done >= L or (eager and arrived(base + done))):
                finish(done)
                done += 1
            if timed and self.slow:
                rec.slow[i] = self.slow_sleep(rec, i, step_cpu)
                rec.delay[i] += rec.slow[i]
        step_cpu = 0.0
        while done < len(batches):
            finish(done)
            done += 1
        if timed and self.slow and len(batches):  # the drain is work too, slowed as the steps were
            slept = self.slow_sleep(rec, len(batches), step_cpu)
            rec.drain_slow = slept  # after the drain's waits: the replay puts it there
            rec.slow[-1] += slept
            rec.delay[-1] += slept
        return preds

    def run_sync(self, start_exchange, batches, rec, progress):
        """The synchronous loop of gloo and MPI: lookup, exchange with the bottom MLP overlapped, top.

        ``start_exchange(send, recv)`` starts the nonblocking alltoallv
        (``Ialltoallv``, ``async_op=True``) and returns its wait.  The
        bottom MLP runs between the two, as the bls loop runs it between
        publishing and receiving: both backends overlap the same work with
        waiting for their peers.  Returns the predictions and the seconds
        spent in the exchange's calls (its start and its wait).
        """
        P = self.nprocs
        send = np.empty(int(self.send_counts.sum()), dtype=np.float32)
        recv = np.empty(int(self.recv_counts.sum()), dtype=np.float32)
        send_blocks = self.outgoing(np.split(send, np.cumsum(self.send_counts)[:P - 1]))
        recv_blocks = np.split(recv, np.cumsum(self.recv_counts)[:P - 1])
        preds = np.empty((len(batches), self.b), dtype=np.float32)
        timed = rec is not None
        waited = 0.0
        stage = "timed" if timed else "warm-up"
        for i, batch in enumerate(batches):
            self.at = (stage, i, len(batches))
            if timed:
                rec.start[i] = now()
                injected = self.injected_delay(i)
                rec.delay[i] += injected
                rec.before[i] += injected
            c0, p0 = now(), cpu_now() if timed else 0.0
            self.lookup(batch, send_blocks)
            c1, p1 = now(), cpu_now() if timed else 0.0
            wait = start_exchange(send, recv)
            c2, p2 = now(), cpu_now() if timed else 0.0
            x = self.bottom(batch)
            c3, p3 = now(), cpu_now() if timed else 0.0
            wait()
            c4, p4 = now(), cpu_now() if timed else 0.0
            self.gather(recv_blocks)
            cg = now()
            preds[i] = self.top(x)
            c5, p5 = now(), cpu_now() if timed else 0.0
            waited += (c2 - c1) + (c4 - c3)
            if timed:
                step_cpu = (p1 - p0) + (p3 - p2) + (p5 - p4)
                rec.compute[i] = (c1 - c0) + (c3 - c2) + (c5 - c4)
                rec.before[i] += c1 - c0
                rec.between[i] += c3 - c2
                rec.after[i] = c5 - c4
                rec.finish[i] = c5
                rec.cpu += step_cpu
                for phase, seconds in (("lookup", c1 - c0), ("bottom", c3 - c2), ("gather", cg - c4),
                                       ("top", c5 - cg)):
                    rec.phases[phase] += seconds
                if self.slow:
                    rec.slow[i] = self.slow_sleep(rec, i, step_cpu)
                    rec.delay[i] += rec.slow[i]
            progress.update(i + 1)
        if timed and self.slow and len(batches):  # the sleep bls takes after its drain (this loop has none)
            slept = self.slow_sleep(rec, len(batches), 0.0)
            rec.slow[-1] += slept
            rec.delay[-1] += slept
        return preds, waited

    # ------------------------------------------------------------- runs

    def warmup_batches(self):
        return list(range(self.cfg.warmup_batches))

    def result(self, preds, rec, begin, end, wait_s, **extra):
        out = {"rank": self.rank, "predictions": preds, "begin": begin, "end": end, "wait_s": wait_s,
               "tables": list(self.own_tables), "slice": (self.lo, self.hi), "pid": os.getpid()}
        out.update(rec.as_dict())
        out.update(extra)
        return out


@contextlib.contextmanager
def _timeouts_name_the_batch(r):
    """A collective that timed out says in which batch, and that ``--timeout`` set its limit.

    Its own message counts blsshm's iterations (barriers and warm-up
    included) or says nothing of the batch (gloo).
    """
    try:
        yield
    except Exception as exc:
        # blsshm raises a TimeoutError; gloo a RuntimeError (DistBackendError) saying so.
        if not (isinstance(exc, TimeoutError) or (isinstance(exc, RuntimeError) and "Timed out" in str(exc))):
            raise
        stage, i, n = r.at
        where = f"{stage} batch {i + 1} of {n}" if n else stage
        raise TimeoutError(f"in {where}, a wait took longer than --timeout {r.cfg.timeout_s:g} s: {exc}") from exc


def _barrier(comm, **timeout):
    """Every rank of ``comm`` got here: an alltoallv of nothing."""
    comm.alltoallv(np.empty(0, dtype=np.float32), [0] * comm.size, **timeout)


def bls_rank(comm, cfg, label, progress_relay=None):
    """Entry of a rank under ``blsshm.spawn``; ``progress_relay`` as for :class:`Progress`."""
    r = Rank(cfg, comm.rank)
    # --timeout bounds the waits of the run, not a peer's setup: building a
    # large table can take longer.  A rank that dies meanwhile is still noticed.
    _barrier(comm, timeout=None)
    quiet = Progress(False, "", 1, 0)
    with _timeouts_name_the_batch(r):
        r.run_bls(comm, r.warmup_batches(), None, quiet)
        r.at = ("the barrier before the timed batches", 0, 0)
        _barrier(comm)  # start together
    comm.reset_stats()
    n = cfg.num_batches
    rec = Record(n)
    progress = Progress(cfg.progress and comm.rank == 0, label, n, cfg.batch_size, progress_relay)
    begin = now()
    with _timeouts_name_the_batch(r):
        preds = r.run_bls(comm, list(range(n)), rec, progress)
    end = now()
    stats = comm.stats
    # rec.exchange: as gloo's and MPI's time inside their collective's calls.
    return r.result(preds, rec, begin, end, rec.exchange, futex_sleeps=stats["futex_sleeps"])


def sync_rank(r, start_exchange, barrier, label, progress_relay=None, draw=True, heartbeat=None):
    """The timed part of a synchronous backend, after its setup.

    ``progress_relay``, ``draw`` and ``heartbeat`` are rank 0's, as for :class:`Progress`.
    """
    quiet = Progress(False, "", 1, 0, heartbeat=heartbeat)
    with _timeouts_name_the_batch(r):
        r.run_sync(start_exchange, r.warmup_batches(), None, quiet)
        r.at = ("the barrier before the timed batches", 0, 0)
        barrier()
    n = r.cfg.num_batches
    rec = Record(n)
    progress = Progress(r.cfg.progress and r.rank == 0, label, n, r.cfg.batch_size, progress_relay, draw,
                        heartbeat)
    begin = now()
    with _timeouts_name_the_batch(r):
        preds, waited = r.run_sync(start_exchange, list(range(n)), rec, progress)
    end = now()
    return r.result(preds, rec, begin, end, waited)


def gloo_rank(rank, cfg, init_file, label, progress_relay=None):
    """Entry of a rank of the gloo backend (torch.distributed ``all_to_all_single``)."""
    import datetime

    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    r = Rank(cfg, rank)
    # --timeout bounds the collectives of the run, not a peer's setup: the
    # rendezvous and a first barrier wait without it (the parent stops the
    # run if a rank dies), then the run uses a group with --timeout.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=cfg.nprocs, timeout=datetime.timedelta(seconds=SETUP_TIMEOUT_S))
    try:
        dist.barrier()
        group = dist.new_group(timeout=datetime.timedelta(seconds=cfg.timeout_s))
        send_splits, recv_splits = r.send_counts.tolist(), r.recv_counts.tolist()

        def start_exchange(send, recv):
            return dist.all_to_all_single(torch.from_numpy(recv), torch.from_numpy(send),  # no copy
                                          output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                          group=group, async_op=True).wait

        return sync_rank(r, start_exchange, lambda: dist.barrier(group=group), label, progress_relay)
    finally:
        dist.destroy_process_group()


def mpi_rank(cfg, label, progress_relay=None, heartbeat_path=None):
    """Entry of a rank of the MPI backend (mpi4py ``Ialltoallv``), under mpirun.

    The exchange starts before the bottom MLP and is waited on after it,
    as in the other backends.  Open MPI moves large blocks only inside its
    ``Wait`` (no progress thread), so this measures about what the blocking
    ``Alltoallv`` after the bottom MLP would: waited at once, the two took
    alike (2 ranks, 64 KiB-3.3 MiB per pair: within 2 %).

    Rank 0 writes its progress to ``progress_relay`` (see :class:`Progress`)
    and touches ``heartbeat_path`` as it starts, as it reads data, once set
    up and as batches finish (see :class:`Heartbeat`).
    """
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    heartbeat = Heartbeat(heartbeat_path if comm.rank == 0 else None)
    heartbeat()
    r = Rank(cfg, comm.rank, heartbeat)  # reading a data file may take minutes
    heartbeat.last = -math.inf  # the end of setup is always told
    heartbeat()
    sdispls = np.concatenate([[0], np.cumsum(r.send_counts)[:-1]]).tolist()
    rdispls = np.concatenate([[0], np.cumsum(r.recv_counts)[:-1]]).tolist()
    scounts, rcounts = r.send_counts.tolist(), r.recv_counts.tolist()

    def start_exchange(send, recv):
        return comm.Ialltoallv([send, (scounts, sdispls), MPI.FLOAT], [recv, (rcounts, rdispls), MPI.FLOAT]).Wait

    result = sync_rank(r, start_exchange, comm.Barrier, label, progress_relay, draw=False,  # mpirun has our stderr
                       heartbeat=heartbeat)
    result["mpi_library"] = MPI.Get_library_version().rstrip("\x00").strip().splitlines()[0]  # its C string's NUL too
    return result
