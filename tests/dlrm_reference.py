"""Checkpoint contents in the reference DLRM's layout, for the dlrm_bench tests."""
import collections

import torch


def random_state_dict(rows, bot, top, width, seed):
    """Random parameters under the reference's names and shapes (an ``OrderedDict``, as ``state_dict()``).

    ``nn.Sequential`` MLPs whose ``Linear`` layers sit at even indices
    (``bot_l.<2k>``, ``top_l.<2k>``) and tables ``emb_l.<i>.weight`` of
    ``rows[i]`` x ``width``, as facebookresearch/dlrm ``dlrm_s_pytorch.py`` names them.
    """
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    for name, sizes in (("bot_l", bot), ("top_l", top)):
        for k in range(len(sizes) - 1):
            n, m = sizes[k], sizes[k + 1]
            sd[f"{name}.{2 * k}.weight"] = 2 * torch.randn(m, n, generator=g) / n ** 0.5
            sd[f"{name}.{2 * k}.bias"] = 0.3 * torch.randn(m, generator=g)
    for i, r in enumerate(rows):
        sd[f"emb_l.{i}.weight"] = 2 * torch.rand(int(r), width, generator=g) - 1
    return sd
