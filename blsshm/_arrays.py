"""Accepting numpy arrays and CPU torch tensors alike, without copying."""
import sys

import numpy as np

from blsshm.errors import BlsTypeError, BlsValueError


def as_array(x, what, contiguous=True, written=False):
    """``(ndarray, was_torch)`` viewing a numpy array or CPU torch tensor (a contiguous one, if ``contiguous``).

    The array is a plain ndarray even for a numpy subclass: what arrives in
    an ``out`` comes back as one whatever ``out``'s size.  ``written``: blsshm
    will write into ``x`` (an ``out``), which torch's rules for in-place
    writes must allow; call :func:`mark_written` after writing.
    """
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):  # the mask would be ignored, and a stale one hide data
            raise BlsTypeError(f"{what} is a numpy masked array, whose mask blsshm would ignore; "
                               f"give a plain array (x.filled(...) or x.data)")
        return (x if type(x) is np.ndarray else x.view(np.ndarray)), False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise BlsTypeError(f"{what} is a tensor on {x.device}; blsshm moves CPU tensors only")
        if x.is_nested:
            raise BlsTypeError(f"{what} is a nested tensor; blsshm moves dense tensors only "
                               f"(send its .values(), or torch.nested.to_padded_tensor of it)")
        if x.layout != torch.strided:  # numpy's TypeError would blame the dtype
            raise BlsTypeError(f"{what} is a {x.layout} tensor; blsshm moves dense tensors only "
                               f"(call .to_dense() first)")
        if contiguous and not x.is_contiguous():  # numpy's advice (ascontiguousarray) would be the wrong one
            if written:  # .contiguous() would make a copy, not fill this tensor
                raise BlsValueError(f"{what} must be C-contiguous: blsshm fills it in one piece, "
                                    f"not through strides")
            raise BlsValueError(f"{what} must be C-contiguous (call .contiguous() on the tensor)")
        if written:  # the checks torch makes before an in-place write or an out= argument
            if x.requires_grad and torch.is_grad_enabled():
                raise BlsValueError(f"{what} requires grad, and autograd cannot follow what blsshm writes "
                                    f"into it (as torch's out= arguments); give a tensor that does not, "
                                    f"or call under torch.no_grad()")
            if x.is_inference() and not torch.is_inference_mode_enabled():
                raise BlsValueError(f"{what} is an inference tensor, which torch lets be written only "
                                    f"inside torch.inference_mode()")
        try:
            return x.detach().numpy(), True
        except TypeError as exc:
            bits = 8 * x.element_size()
            raise BlsTypeError(f"{what} has dtype {x.dtype}, which numpy cannot view ({exc}); move it as "
                               f"an integer dtype of the same size: x.view(torch.int{bits}), and .view() "
                               f"what arrives as {x.dtype}") from None
        except RuntimeError as exc:  # a lazy conjugate or negative bit: numpy would see the wrong values
            if written:  # torch's advice (resolve first) would make a copy, not fill this tensor
                raise BlsTypeError(f"{what} has its lazy conjugate or negative bit set, so numpy cannot "
                                   f"view it; give a tensor without it") from None
            raise BlsTypeError(f"{what} cannot be viewed by numpy without a copy: {exc}") from None
    raise BlsTypeError(f"{what} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def mark_written(x):
    """Tell torch that blsshm wrote into tensor ``x`` (an ``out``), as an in-place op would.

    Its version counter goes up, so autograd refuses a backward pass that
    would use what ``x`` held before (detach() shares the counter).
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and not x.is_inference():
        torch.autograd.graph.increment_version(x)


def tensor_as_array(x, what):
    """A torch tensor viewed as numpy (as :func:`as_array`); anything else unchanged."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return as_array(x, what, contiguous=False)[0]
    return x


def to_torch(array):
    """The torch tensor sharing ``array``'s memory."""
    return sys.modules["torch"].from_numpy(array)
