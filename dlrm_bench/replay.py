"""The bls loop replayed with a free exchange: what the lag rule alone costs.

The bounds in :mod:`dlrm_bench.report` hold for every schedule, so they can
sit far below what any real loop reaches.  This replays the one schedule
:meth:`dlrm_bench.worker.Rank.run_bls` follows, from each rank's measured
per-iteration times, with publishing, arrival and the lag gate free and
instant, every rank on a core of its own:

- injected delay, then ``post(t)``: it waits until every rank has left
  ``complete(t - L - 1)`` (the gate of DESIGN §2), then the lookup, after
  which ``t`` is published; then the bottom MLP;
- then, in order, every iteration whose blocks have all arrived (the eager
  pipeline; ``fixed`` skips this) and the oldest one once ``L`` are
  outstanding, waiting for it: gather (peers' buffers held), then top MLP;
- a slow rank's extra sleep ends the step, and its drain (after the
  last step, completing what is left) too.

The loop's choices are taken at the replayed times, so the replay is a model
of this loop, not a bound.  A run's wall time over its replay is what the
exchange itself cost (wake-ups, copies, caches gone cold while waiting); the
replay over the ideal bound is what lag ``L`` leaves of the delays.
"""
import heapq
import itertools

import numpy as np


def replay_bls(delay, lookup, bottom, gather, top, slow, lag, eager=True, drain_slow=None):
    """Replayed wall time (seconds) of the bls loop with a free exchange.

    Arrays are ``[rank, iteration]`` seconds, as each rank measured them:
    ``delay`` injected before posting, ``lookup`` inside ``post``, ``bottom``
    after it, ``gather`` inside ``complete``, ``top`` after it, ``slow`` at
    the end of the step; ``drain_slow`` (``[rank]``, default none) after
    the drain.  ``lag`` and ``eager`` are the run's.
    """
    nprocs, n = lookup.shape
    published = np.full((nprocs, n), np.inf)  # when rank r published t, once replayed
    released = np.full((nprocs, n), np.inf)   # when rank r left complete(t), once replayed

    def loop(r):
        """Rank r's loop; yields (what it waits for, iteration, when it starts waiting)."""
        now, done = 0.0, 0

        def finish():
            nonlocal now, done
            now = yield ("published", done, now)
            released[r, done] = now + gather[r, done]
            now += gather[r, done] + top[r, done]
            done += 1

        for i in range(n):
            now += delay[r, i]
            if i > lag:
                now = yield ("released", i - lag - 1, now)
            now += lookup[r, i]
            published[r, i] = now
            now += bottom[r, i]
            while done <= i:
                if i - done < lag and not (eager and (yield ("arrived", done, now))):
                    break
                yield from finish()
            now += slow[r, i]
        while done < n:
            yield from finish()
        return now + (drain_slow[r] if drain_slow is not None else 0.0)

    # Events run in time order, so when one at time `when` runs, every record
    # stamped at or before `when` is written: a record is written by an event
    # no later than its stamp (a rank writes ahead only up to its next wait).
    loops = [loop(r) for r in range(nprocs)]
    events, order = [], itertools.count()
    parked = {}  # rank -> (records, iteration, since): waits on a record not yet replayed
    ends = [0.0] * nprocs

    def resume(r, value):
        try:
            what, t, when = loops[r].send(value)
        except StopIteration as stop:
            ends[r] = stop.value
            return
        heapq.heappush(events, (when, next(order), r, what, t))

    for r in range(nprocs):
        resume(r, None)
    while events:
        when, _, r, what, t = heapq.heappop(events)
        if what == "arrived":
            # A publish not yet written comes later than now (lookups take time).
            resume(r, bool((published[:, t] <= when).all()))
        else:
            parked[r] = (published if what == "published" else released, t, when)
        woke = True
        while woke:  # a resumed rank may write what another waits for
            woke = False
            for q, (records, t_q, since) in list(parked.items()):
                if np.isfinite(records[:, t_q]).all():
                    del parked[q]
                    resume(q, max(since, float(records[:, t_q].max())))
                    woke = True
    if parked:
        raise RuntimeError(f"replay stalled: ranks {sorted(parked)} wait for records no rank writes")
    return max(ends)
