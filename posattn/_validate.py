"""Input checks shared by the public ops. Each error names the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {x.dtype}")
    return x


def int_tensor(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in INT_DTYPES:
        if x.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor (int32 or int64); got {x.dtype} "
                            f"(float positions are not supported by this op)")
        raise TypeError(f"{name} must be an integer tensor (int32 or int64); got {x.dtype}")
    return x


def same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"all tensors must be on one device")


def boolean(value, name: str) -> None:
    """A flag must be a real bool (1, "yes" or a tensor would silently mean something else)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def choice(value, name: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
