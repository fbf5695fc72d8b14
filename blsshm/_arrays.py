"""Accepting numpy arrays and CPU torch tensors alike, without copying."""
import sys

import numpy as np

from blsshm.errors import BlsTypeError, BlsValueError


def as_array(x, what, contiguous=True):
    """``(ndarray, was_torch)`` viewing a numpy array or CPU torch tensor (a contiguous one, if ``contiguous``)."""
    if isinstance(x, np.ndarray):
        return x, False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise BlsTypeError(f"{what} is a tensor on {x.device}; blsshm moves CPU tensors only")
        if x.layout != torch.strided:  # numpy's TypeError would blame the dtype
            raise BlsTypeError(f"{what} is a {x.layout} tensor; blsshm moves dense tensors only "
                               f"(call .to_dense() first)")
        if contiguous and not x.is_contiguous():  # numpy's advice (ascontiguousarray) would be the wrong one
            raise BlsValueError(f"{what} must be C-contiguous (call .contiguous() on the tensor)")
        try:
            return x.detach().numpy(), True
        except TypeError as exc:
            raise BlsTypeError(f"{what} has dtype {x.dtype}, which numpy cannot view: {exc}") from None
        except RuntimeError as exc:  # a lazy conjugate or negative bit: numpy would see the wrong values
            raise BlsTypeError(f"{what} cannot be viewed by numpy without a copy: {exc}") from None
    raise BlsTypeError(f"{what} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def tensor_as_array(x, what):
    """A torch tensor viewed as numpy (as :func:`as_array`); anything else unchanged."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return as_array(x, what, contiguous=False)[0]
    return x


def to_torch(array):
    """The torch tensor sharing ``array``'s memory."""
    return sys.modules["torch"].from_numpy(array)
