"""dlrm_bench: model-parallel DLRM inference with a bounded-lag alltoallv.

``python -m dlrm_bench --lag 4`` runs the reference DLRM architecture with
its embedding tables sharded across processes; see ``--help``.  Modules:
``config`` (command line), ``model`` (the reference model), ``data``,
``criteo`` and ``processed`` (batches), ``sharding`` (placement), ``_pooling`` (the Cython
lookup kernel), ``worker`` (one rank's loop), ``backends`` (starting the
ranks), ``report`` and ``verify``.
"""
