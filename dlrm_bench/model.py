"""The reference DLRM model: its parameters, their initialisation and checkpoint, its forward pass.

Same architecture, parameter names and initialisation rules as the
reference implementation (facebookresearch/dlrm, ``dlrm_s_pytorch.py``):

- bottom MLP ``bot_l``: ``Linear``/``ReLU`` pairs over the dense features;
- embedding tables ``emb_l.<i>.weight``, ``(rows_i, d)``, sum-pooled bags;
- interaction (``--arch-interaction-op``): the bottom output and the pooled
  embeddings stacked as ``(batch, 1 + tables, d)``; ``dot`` (the default)
  concatenates after the bottom output their pairwise dot products, the
  strictly lower triangle, or with ``--arch-interaction-itself`` the lower
  triangle with its diagonal; ``cat`` concatenates the stacked features;
- top MLP ``top_l``: ``Linear``/``ReLU`` pairs, the last one a ``Sigmoid``.

The MLPs are replicated on every rank; a rank holds only its own tables,
as numpy arrays that the Cython lookup kernel reads.  Initial values are
drawn per table and per layer from the seed, so a rank can make its own
tables without making the others, and every process gets the same model.
"""
import contextlib
import pickle

import numpy as np
import torch
from torch import nn

# Streams of the seed, so that tables, layers and data never share draws.
TABLE_STREAM, LAYER_STREAM = 1, 2


def create_mlp(sizes, *, top, seed):
    """``nn.Sequential`` of ``Linear`` + activation, initialised as the reference does.

    Layer ``i`` (``n`` inputs, ``m`` outputs) gets weights drawn from
    N(0, sqrt(2 / (m + n))) and biases from N(0, sqrt(1 / m)); its
    activation is ReLU, or Sigmoid for the last layer of the top MLP
    (``top=True``).
    """
    layers = []
    for i in range(len(sizes) - 1):
        n, m = int(sizes[i]), int(sizes[i + 1])
        linear = nn.Linear(n, m, bias=True)
        rng = np.random.default_rng([seed, LAYER_STREAM, int(top), i])
        w = rng.normal(0.0, np.sqrt(2.0 / (m + n)), size=(m, n)).astype(np.float32)
        b = rng.normal(0.0, np.sqrt(1.0 / m), size=m).astype(np.float32)
        linear.weight.data = torch.from_numpy(w)
        linear.bias.data = torch.from_numpy(b)
        layers.append(linear)
        last = i == len(sizes) - 2
        layers.append(nn.Sigmoid() if (top and last) else nn.ReLU())
    return nn.Sequential(*layers)


def init_table(rows, dim, table, seed, beat=None, chunk_values=1 << 22):
    """Table ``table``'s initial weights: uniform in +-sqrt(1 / rows), as the reference.

    Drawn in float64 a chunk of rows at a time (``chunk_values`` values,
    32 MiB), so the table takes its own float32 size, not three times it;
    the draws, and so the values, are those of one ``uniform`` call.
    ``beat`` (if given) is called after every chunk: a sign of progress.
    """
    rng = np.random.default_rng([seed, TABLE_STREAM, table])
    bound = np.sqrt(1.0 / rows)
    out = np.empty((rows, dim), dtype=np.float32)
    step = max(1, chunk_values // max(dim, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop] = rng.uniform(-bound, bound, size=(stop - start, dim))
        if beat is not None:
            beat()
    return out


INTERACTION_OPS = ("dot", "cat")


def _check_interaction_op(op):
    if op not in INTERACTION_OPS:
        raise ValueError(f"interaction op must be one of {INTERACTION_OPS}, got {op!r}")


def interaction_pairs(num_features, itself=False):
    """Row and column of every lower-triangle pair, in the reference's order.

    The strictly lower triangle, or with ``itself`` the diagonal too (each
    feature's dot product with itself), row by row as ``dlrm_s_pytorch.py``'s
    ``li``/``lj``.
    """
    offset = 1 if itself else 0
    li = [i for i in range(num_features) for j in range(i + offset)]
    lj = [j for i in range(num_features) for j in range(i + offset)]
    return torch.tensor(li, dtype=torch.long), torch.tensor(lj, dtype=torch.long)


def interaction_size(num_tables, dim, op="dot", itself=False):
    """Width of the interaction output: the top MLP's input (the reference's ``num_int``)."""
    _check_interaction_op(op)
    features = num_tables + 1
    if op == "cat":
        return features * dim
    return dim + (features * (features + 1) // 2 if itself else features * (features - 1) // 2)


class DenseModel(nn.Module):
    """The replicated part of DLRM: bottom MLP, interaction, top MLP.

    ``forward(dense, pooled)`` takes ``(b, bottom_in)`` dense features and
    ``(b, tables, d)`` pooled embeddings in global table order, and returns
    ``(b,)`` click probabilities.  ``interaction_op`` and
    ``interaction_itself`` are the reference's ``--arch-interaction-op`` and
    ``--arch-interaction-itself`` (which ``cat`` ignores, as the reference does).
    """

    def __init__(self, mlp_bot, mlp_top, num_tables, seed, interaction_op="dot", interaction_itself=False):
        super().__init__()
        _check_interaction_op(interaction_op)
        self.bot_l = create_mlp(mlp_bot, top=False, seed=seed)
        self.top_l = create_mlp(mlp_top, top=True, seed=seed)
        self.interaction_op = interaction_op
        self.li, self.lj = interaction_pairs(num_tables + 1, interaction_itself)

    def bottom(self, dense):
        return self.bot_l(dense)

    def top(self, x, pooled):
        """Predictions from the bottom output ``x`` and ``(b, tables, d)`` pooled embeddings."""
        return self.top_stacked(torch.cat([x.unsqueeze(1), pooled], dim=1))

    def top_stacked(self, stacked):
        """Predictions from ``stacked``: bottom output then pooled embeddings, ``(b, 1 + tables, d)``.

        The reference builds the same array with ``torch.cat``; a caller that
        gathers embeddings straight into it saves that copy.
        """
        batch = stacked.shape[0]
        if self.interaction_op == "cat":  # the reference's torch.cat([x] + ly, dim=1)
            r = stacked.reshape(batch, -1)
        else:
            z = torch.bmm(stacked, torch.transpose(stacked, 1, 2))
            r = torch.cat([stacked[:, 0, :], z[:, self.li, self.lj]], dim=1)
        return self.top_l(r).view(batch)

    def forward(self, dense, pooled):
        return self.top(self.bottom(dense), pooled)


def _numpy_scalar_globals():
    """What ``weights_only`` loading needs for numpy scalars, and nothing more.

    The reference saves ``train_acc``, ``train_loss``, ``test_acc`` and
    ``test_loss`` as numpy scalars beside the ``state_dict``; without these,
    torch refuses every checkpoint the reference writes.
    """
    scalar = np.float64(0.0).__reduce__()[0]  # numpy._core.multiarray.scalar (numpy.core before numpy 2)
    dtypes = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    allowed = [scalar, np.dtype, *dtypes]
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 6):  # (global, name): files of numpy 1
        allowed.append((scalar, "numpy.core.multiarray.scalar"))
    return allowed


# How a file of torch.save starts: a zip archive (torch >= 1.6), or a pickle
# (protocol 2 and up begin with PROTO; legacy torch.save's first is its magic number).
TORCH_SAVE_HEADS = (b"PK\x03\x04", b"\x80")


def read_checkpoint(path):
    """The ``state_dict`` of a reference DLRM checkpoint, memory-mapped where possible.

    ``ValueError`` for a file torch.save did not write, or one holding
    objects a weights-only load refuses (torch's own message for either
    asks to retry with ``weights_only=False``, which the user cannot do).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_SAVE_HEADS):
        raise ValueError(f"{path} is not a checkpoint torch.save wrote (those start with a zip or pickle "
                         f"header; it starts with {head!r})")
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with safe(_numpy_scalar_globals()) if safe else contextlib.nullcontext():
        try:
            try:
                ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # an old, non-zip checkpoint cannot be memory-mapped
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message: a paragraph on weights_only, then the cause on the line after this.
            cause = str(exc).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].strip()
            cause = cause.split(". ")[0].rstrip(".")  # not its advice: allowing a class is not ours to do
            raise ValueError(f"{path} is damaged or holds more than tensors and plain data, which a "
                             f"weights-only load (the safe one) refuses: "
                             f"{cause or next(iter(str(exc).strip().splitlines()), 'UnpicklingError')}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a DLRM checkpoint: no 'state_dict' key")
    return ckpt["state_dict"]


def check_checkpoint(sd, dim, table_rows, mlp_bot, mlp_top, rows_from="the flags", rows_hint=""):
    """Raise ``ValueError`` naming the first parameter whose shape differs from the flags.

    ``rows_from`` says where ``table_rows`` came from, for the message, and
    ``rows_hint`` (a parenthesis, or empty) how a table could have fewer rows.
    """
    expected = {f"emb_l.{i}.weight": (rows, dim) for i, rows in enumerate(table_rows)}
    for name, sizes in (("bot_l", mlp_bot), ("top_l", mlp_top)):
        for i in range(len(sizes) - 1):
            expected[f"{name}.{2 * i}.weight"] = (sizes[i + 1], sizes[i])
            expected[f"{name}.{2 * i}.bias"] = (sizes[i + 1],)
    for key, shape in expected.items():
        if key not in sd:
            raise ValueError(f"checkpoint has no {key} (expected shape {shape}){_missing_hint(sd, key)}")
        got = tuple(sd[key].shape)
        if got != tuple(shape):
            source, hint = "the flags", ""
            if key.startswith("emb_l.") and len(got) == 2 and got[0] == shape[0]:  # only the width differs
                source = f"--arch-sparse-feature-size {dim}"
                hint = (f" (give the checkpoint's width, {got[1]}, as --arch-sparse-feature-size "
                        f"and as the last size of --arch-mlp-bot)")
            elif key.startswith("emb_l.") and len(got) == 2:  # the rows differ (and maybe the width)
                source = rows_from + (f" and --arch-sparse-feature-size {dim}" if got[1] != dim else "")
                hint = rows_hint if got[0] < shape[0] else ""  # the hints are for fewer rows
            elif key == "top_l.0.weight" and got[:1] == shape[:1]:
                # The top MLP's input is the interaction's width, which no size flag sets.
                hint = (" (its input is the interaction's width: give the --arch-interaction-op and "
                        "--arch-interaction-itself the checkpoint was trained with)")
            raise ValueError(f"checkpoint {key} has shape {got}; expected {tuple(shape)}, from {source}{hint}")
        if not sd[key].is_floating_point():  # float16/bfloat16/float64 are computed in float32
            raise ValueError(f"checkpoint {key} holds {sd[key].dtype}, not floating-point weights")
        # NaN in an MLP makes every prediction NaN, which --verify cannot check;
        # checked in float32, as computed: float64's 1e300 is inf there (an inf
        # top bias gives finite predictions of 1, equal whatever the blocks).
        # Tables are not scanned (gigabytes, memory-mapped): a NaN row makes the
        # predictions of the samples that look it up NaN, which --verify reports.
        if not key.startswith("emb_l.") and not bool(torch.isfinite(sd[key].to(torch.float32)).all()):
            raise ValueError(f"checkpoint {key} holds non-finite values (NaN or inf)")
    weighted = sorted(k for k in sd if k.startswith("v_W_l."))
    if weighted:  # the reference's --weighted-pooling learned: ignoring them would change every bag
        raise ValueError(f"checkpoint has learned pooling weights ({', '.join(weighted[:3])}), "
                         f"saved with the reference's --weighted-pooling learned; dlrm_bench pools "
                         f"unweighted sums only")
    extra = sorted(k for k in sd if k.startswith(("emb_l.", "bot_l.", "top_l.")) and k not in expected)
    if extra:
        raise ValueError(f"checkpoint has parameters the flags do not describe: {', '.join(extra[:3])}")


def _missing_hint(sd, key):
    """Why ``key`` may be missing from ``sd``, as a message's ending."""
    wrapped = [k for k in sd if k.replace("module.", "") == key]
    if wrapped:  # torch's DistributedDataParallel (or DataParallel) puts "module." in its names
        return (f"; it has {wrapped[0]}, the name in a model wrapped in DistributedDataParallel (or "
                f"DataParallel), as the reference's MLPs are when it runs on several processes: "
                f"dlrm_bench reads the checkpoint of a single-process run")
    names = sorted(sd)
    return f"; it has {len(names)} entries: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"


class Model:
    """One process's share of the model: the replicated MLPs and the tables it owns."""

    def __init__(self, dense, tables):
        self.dense = dense    # DenseModel
        self.tables = tables  # global table index -> (rows, d) float32 array

    @classmethod
    def build(cls, cfg, owned_tables, beat=None):
        """Initialise from the seed, or load ``cfg.load_model``; keep only ``owned_tables``.

        ``beat``: see :func:`init_table`; loading calls it after each table.
        """
        dense = DenseModel(cfg.mlp_bot, cfg.mlp_top, len(cfg.table_rows), cfg.seed,
                           cfg.interaction_op, cfg.interaction_itself)
        if cfg.load_model is None:
            tables = {t: init_table(cfg.table_rows[t], cfg.sparse_size, t, cfg.seed, beat) for t in owned_tables}
        else:
            sd = read_checkpoint(cfg.load_model)
            dense.load_state_dict({k: v for k, v in sd.items() if k.startswith(("bot_l.", "top_l."))})
            # Widened or rounded to float32 as the reference's load_state_dict
            # would; a float32 table stays memory-mapped (to() returns it as is).
            tables = {}
            for t in owned_tables:
                tables[t] = np.ascontiguousarray(sd[f"emb_l.{t}.weight"].detach().to(torch.float32).numpy())
                if beat is not None:  # a conversion of a big table takes seconds
                    beat()
        dense.eval()
        return cls(dense, tables)
