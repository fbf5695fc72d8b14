"""CPU torch tensors go in and come out without copies."""
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import blsshm

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(60)


def _tensors(comm):
    send = torch.arange(4, dtype=torch.float32) + 10 * comm.rank
    recv, counts = comm.alltoallv(send, [2, 2])
    out = torch.empty(8, dtype=torch.float32)
    comm.post(1, send.requires_grad_(), [1, 3])
    recv2, counts2 = comm.complete(1, out=out)
    return (type(recv).__name__, recv.tolist(), counts.tolist(),
            recv2.tolist(), counts2.tolist(), recv2.data_ptr() == out.data_ptr())


def test_torch_tensors_round_trip():
    for me, (kind, recv, counts, recv2, counts2, shares) in enumerate(blsshm.spawn(_tensors, 2)):
        assert kind == "Tensor"
        assert recv == [2 * me, 2 * me + 1, 10 + 2 * me, 11 + 2 * me] and counts == [2, 2]
        expect2 = [0.0, 10.0] if me == 0 else [1.0, 2.0, 3.0, 11.0, 12.0, 13.0]
        assert recv2 == expect2 and shares


def _return_tensors(comm, given):
    recv, _ = comm.alltoallv(torch.arange(comm.size, dtype=torch.float32), [1] * comm.size)
    return recv, given + comm.rank


def test_spawn_returns_tensors():
    # Sent through torch's ForkingPickler reducers, a tensor was a handle to
    # the exiting rank's memory: the parent failed to rebuild it.
    results = blsshm.spawn(_return_tensors, 2, args=(torch.ones(2),))
    for me, (recv, mine) in enumerate(results):
        assert torch.equal(recv, torch.full((2,), float(me))) and torch.equal(mine, torch.ones(2) + me)


def test_tensor_input_is_not_copied():
    t = torch.arange(6, dtype=torch.float64)
    array, was_torch = blsshm._arrays.as_array(t, "send")
    assert was_torch and np.shares_memory(array, t.numpy())


def test_unsupported_tensors_are_named():
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(blsshm.BlsTypeError, match=r"bfloat16.*x\.view\(torch\.int16\)"):
            comm.alltoallv(torch.zeros(2, dtype=torch.bfloat16), [2])
        with pytest.raises(blsshm.BlsValueError, match=r"contiguous \(call \.contiguous\(\) on the tensor\)"):
            comm.alltoallv(torch.zeros(4, 4).t(), [16])
        # .contiguous() would make a copy, and what arrives would not be in out.
        with pytest.raises(blsshm.BlsValueError, match=r"out must be C-contiguous: blsshm fills it in one piece"):
            comm.alltoallv(torch.zeros(16), [16], out=torch.zeros(4, 4).t())
        # Counts need no contiguity: a strided tensor of them is fine.
        recv, counts = comm.alltoallv(torch.zeros(3), torch.tensor([3, 9])[::2])
        assert counts.tolist() == [3]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("to_sparse", [torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr], ids=["coo", "csr"])
def test_sparse_tensors_are_refused_for_their_layout(to_sparse):
    # numpy's own error blamed the dtype ("has dtype torch.float32, which numpy cannot view").
    sparse = to_sparse(torch.eye(2))
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(blsshm.BlsTypeError, match=r"send is a torch.sparse_\w+ tensor.*to_dense"):
            comm.alltoallv(sparse, [4])
        with pytest.raises(blsshm.BlsTypeError, match=r"out is a torch.sparse_\w+ tensor"):
            comm.alltoallv(torch.zeros(4), [4], out=sparse)
        assert comm.alltoallv(sparse.to_dense().flatten(), [4])[0].tolist() == [1, 0, 0, 1]


def test_tensors_with_a_lazy_conjugate_or_negation_are_named():
    """numpy would read the stored values, not the conjugated or negated ones."""
    z = torch.tensor([1 + 2j, 3 - 4j])
    with blsshm.Comm.create(1) as comm:
        for lazy in (z.conj(), torch._neg_view(z)):
            with pytest.raises(blsshm.BlsTypeError, match="send cannot be viewed"):
                comm.alltoallv(lazy, [2])
        recv, _ = comm.alltoallv(z.conj().resolve_conj(), [2])  # resolved, it goes through
        assert recv.tolist() == [1 - 2j, 3 + 4j]


def test_a_lazy_out_is_refused_without_advice_that_would_fill_a_copy():
    # Torch's advice, resolve_neg(), makes a copy: what arrived would not be in out.
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(blsshm.BlsTypeError, match="out has its lazy conjugate or negative bit set"):
            comm.alltoallv(torch.ones(2), [2], out=torch._neg_view(torch.zeros(2)))
        assert comm.alltoallv(torch.ones(2), [2], out=torch.zeros(2))[0].tolist() == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_are_named():
    # Torch's own error was "Internal error: NestedTensorImpl doesn't support sizes".
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(blsshm.BlsTypeError, match=r"send is a nested tensor.*\.values\(\)"):
            comm.alltoallv(nested, [5])
        assert comm.next_post == 0


def _write_out_under_autograd(comm):
    w = torch.ones(3, requires_grad=True)
    b = torch.ones(3)
    y = (w * b).sum()  # backward needs b as it was
    comm.alltoallv(torch.full((3,), 5.0), [3], out=b)
    try:
        y.backward()
    except RuntimeError as exc:
        return b._version, str(exc)
    return b._version, f"gradient {w.grad.tolist()}"


def test_an_out_tensor_is_written_as_torch_writes_in_place():
    # Written through a numpy view, out kept its version: backward then used
    # what arrived as if it were what b held, and gave a wrong gradient.
    with blsshm.Comm.create(1) as comm:
        version, what = _write_out_under_autograd(comm)
        assert version == 1 and "modified by an inplace operation" in what, what
        leaf = torch.zeros(3, requires_grad=True)
        with pytest.raises(blsshm.BlsValueError, match="out requires grad"):
            comm.alltoallv(torch.ones(3), [3], out=leaf)
        with pytest.raises(blsshm.BlsValueError, match="out requires grad"):
            comm.post(1, torch.ones(3), [3]) or comm.complete(1, out=leaf)
        comm.complete(1)
        with torch.no_grad():  # as torch allows (an optimizer's update)
            comm.alltoallv(torch.ones(3), [3], out=leaf)
        assert leaf.tolist() == [1.0, 1.0, 1.0] and leaf.requires_grad
        with torch.inference_mode():
            frozen = torch.zeros(3)
            assert comm.alltoallv(torch.ones(3), [3], out=frozen)[0].tolist() == [1.0] * 3
        with pytest.raises(blsshm.BlsValueError, match="out is an inference tensor"):
            comm.alltoallv(torch.ones(3), [3], out=frozen)
        assert comm.next_post == comm.next_complete == 4


def test_recv_is_of_the_kind_of_out_when_out_is_given():
    # A numpy send with a torch out returned an ndarray, a torch send with a numpy out a tensor.
    with blsshm.Comm.create(1) as comm:
        out_t, out_a = torch.empty(3), np.empty(3, dtype=np.float32)
        recv, _ = comm.alltoallv(np.arange(3, dtype=np.float32), [3], out=out_t)
        assert isinstance(recv, torch.Tensor) and recv.data_ptr() == out_t.data_ptr()
        recv, _ = comm.alltoallv(torch.arange(3.0), [3], out=out_a)
        assert isinstance(recv, np.ndarray) and np.shares_memory(recv, out_a)
        comm.post(2, np.ones(3, dtype=np.float32), [3])
        recv, _ = comm.complete(2, out=out_t)
        assert isinstance(recv, torch.Tensor) and recv.tolist() == [1.0, 1.0, 1.0]
        comm.post(3, torch.ones(3), [3])
        recv, _ = comm.complete(3, out=out_a)
        assert isinstance(recv, np.ndarray) and recv.tolist() == [1.0, 1.0, 1.0]


def test_a_torch_dtype_for_zero_copy_views_is_refused_with_the_way_to_do_it():
    with blsshm.Comm.create(1) as comm:
        with pytest.raises(blsshm.BlsTypeError, match=r"numpy dtype for torch.float32.*torch.from_numpy"):
            with comm.post_views(0, [2], torch.float32):
                pass
        with comm.post_views(0, [2], np.float32) as views:  # nothing was published: 0 is still next
            torch.from_numpy(views[0]).fill_(1.5)
        assert comm.complete(0)[0].tolist() == [1.5, 1.5]



@pytest.mark.parametrize("counts", [torch.tensor([2]), torch.tensor([2], dtype=torch.int32),
                                    torch.tensor([True]), torch.tensor([2.0])],
                         ids=["int64", "int32", "bool", "float"])
def test_tensor_counts_are_checked_as_arrays_are(counts):
    # A bool tensor's elements passed operator.index as 1s, where a bool list
    # or array is refused as surely a mistake.
    with blsshm.Comm.create(1) as comm:
        send = np.arange(2, dtype=np.float64)
        if counts.dtype in (torch.int64, torch.int32):
            assert comm.alltoallv(send, counts)[0].tolist() == [0.0, 1.0]
        else:
            with pytest.raises(blsshm.BlsTypeError, match="send_counts must hold integers"):
                comm.alltoallv(send, counts)
            assert comm.alltoallv(send, [2])[0].tolist() == [0.0, 1.0]  # nothing was published


@pytest.mark.parametrize("call, words", [
    (lambda c, s: c.alltoallv(s, [torch.tensor(True)]), "send_counts[0]"),
    (lambda c, s: c.post(torch.tensor(False), s, [2]), "iteration"),
    (lambda c, s: c.post(torch.tensor(0.5), s, [2]), "iteration"),
    (lambda c, s: c.alltoallv(s, [2], timeout=torch.tensor(True)), "timeout"),
], ids=["bool count", "bool iteration", "float iteration", "bool timeout"])
def test_scalar_tensors_that_are_not_integers_are_refused_as_python_scalars_are(call, words):
    # operator.index took a 0-d bool tensor as 0 or 1 (a count of 1, iteration
    # 0), and a 0-d float tensor's __index__ raised a bare TypeError.
    with blsshm.Comm.create(1) as comm:
        send = np.arange(2, dtype=np.float64)
        with pytest.raises(blsshm.BlsTypeError, match=re.escape(words)):
            call(comm, send)
        assert comm.next_post == 0 and comm.alltoallv(send, [2])[0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.bool])
def test_empty_with_a_torch_dtype_gives_a_zeroed_tensor_on_huge_pages(dtype):
    from blsshm.buffers import HUGE_PAGE_BYTES
    t = blsshm.empty((4, 1 << 18), dtype)  # 1 MiB and more: on huge pages
    assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == (4, 1 << 18)
    assert t.is_contiguous() and not t.any()
    if HUGE_PAGE_BYTES:
        assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    t.view(torch.uint8).fill_(1)  # writable, every byte of it
    assert bool(t.view(torch.uint8).all())


def test_a_tensor_from_empty_is_sent_as_any_tensor():
    send = blsshm.empty(1 << 18, torch.float32)
    send.copy_(torch.arange(1 << 18, dtype=torch.float32))
    with blsshm.Comm.create(1) as comm:
        recv, counts = comm.alltoallv(send, [1 << 18])
    assert isinstance(recv, torch.Tensor) and torch.equal(recv, send) and counts.tolist() == [1 << 18]


_TORCH_BEFORE_FORK = textwrap.dedent("""
    import blsshm, torch
    torch.set_num_threads(2)  # a thread pool, even on one core
    a = torch.ones(256, 256)
    (a @ a).sum()  # the parent runs parallel ops before the ranks are forked

    def rank(comm):
        x = torch.full((256, 256), 1.0 + comm.rank)
        product = (x @ x)[0, 0].item()  # a rank's first parallel op
        recv, _ = comm.alltoallv(torch.full((2,), float(comm.rank)), [1, 1])
        return torch.get_num_threads(), product, recv.tolist()

    if __name__ == "__main__":
        print(blsshm.spawn(rank, 2, start_method="fork"))
""")


@pytest.mark.timeout(180)
def test_forked_ranks_run_torch_ops_after_the_parent_ran_them(tmp_path):
    # torch's thread pool does not survive a fork: a forked rank's first
    # parallel op waited forever for the parent's threads.  In a process of
    # its own, whose thread pool the other tests do not inherit.
    script = tmp_path / "torch_before_fork.py"
    script.write_text(_TORCH_BEFORE_FORK)
    try:
        # A hang is stopped by killing the parent: its ranks die with it
        # (spawn's parent-death signal) and its reaper removes the segment.
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("forked ranks hung in their first parallel torch op")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[(1, 256.0, [0.0, 1.0]), (1, 1024.0, [0.0, 1.0])]"
