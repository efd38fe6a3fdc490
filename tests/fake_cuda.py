"""A simulated CUDA device on the CPU, for the code paths that compute where the inputs are
(``attnprec._device``): tests without a GPU still see every place where a CUDA tensor
would meet a CPU one.

Inside :class:`FakeCuda`, tensors made ``.to("cuda")`` / ``.cuda()``, by a factory with
``device="cuda"`` (or under ``torch.device("cuda")``), or by an operation on such tensors
are *marked*: they hold CPU memory and compute on the CPU (bit for bit what the CPU gives),
but say they are on ``cuda:0`` and refuse what CUDA tensors refuse:

- an operation mixing marked tensors with unmarked ones that are not 0-dim (CPU scalars
  are allowed, as CUDA allows them), except CPU indices of a marked tensor and the
  shape-only ``expand_as`` / ``view_as`` / ``reshape_as``, and copies between devices;
- ``.numpy()`` of a marked tensor;
- a CPU generator drawing on the device.

``.cpu()`` and ``.to("cpu")`` give unmarked tensors. Not simulated: CUDA's own summation
orders and libdevice (tests/test_devices.py checks those on a GPU).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_FACTORIES = _device_constructors()
_SHAPE_ONLY = {torch.Tensor.expand_as, torch.Tensor.view_as, torch.Tensor.reshape_as}
_COPIES = {torch.Tensor.copy_}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _is_device(x: Any) -> bool:
    return isinstance(x, torch.device) or (
        isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda", "meta")
    )


class FakeCuda(TorchFunctionMode):
    """The simulated device (a context): see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        # by id, with a weak reference that says whether the id still names that tensor
        self.marked: dict[int, weakref.ref] = {}
        self.device_ops = 0  # operations on marked tensors so far

    def is_marked(self, x: Any) -> bool:
        ref = self.marked.get(id(x)) if isinstance(x, torch.Tensor) else None
        return ref is not None and ref() is x

    def mark(self, out: Any) -> Any:
        def one(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                self.marked[id(x)] = weakref.ref(x)
            return x

        return tree_map(one, out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "__get__" and args and self.is_marked(args[0]):
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop == "device":
                return CUDA
            if prop == "is_cuda":
                return True
        if func in _FACTORIES:
            dev = kwargs.get("device")
            if _is_cuda(dev):
                gen = kwargs.get("generator")
                if gen is not None and gen.device.type != "cuda":
                    raise RuntimeError(f"{name}: a CPU generator drawing on cuda (fake_cuda)")
                kwargs["device"] = "cpu"
                return self.mark(func(*args, **kwargs))
            if dev is None and any(self.is_marked(a) for a in tree_flatten(args)[0]):
                return self.mark(func(*args, **kwargs))  # torch.tensor of marked scalars
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and self.is_marked(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (fake_cuda)")
        if func is torch.Tensor.cpu:  # a copy, unmarked (the mode is off in here)
            return args[0].clone() if self.is_marked(args[0]) else args[0]
        if func is torch.Tensor.cuda:
            return self.mark(args[0].clone())
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        marked = [x for x in leaves if self.is_marked(x)]
        if marked:
            self._check(func, name, args, leaves)
            self.device_ops += 1
        out = func(*args, **kwargs)
        if marked and func not in _COPIES:
            out = self.mark(out)
        return out

    def _to(self, func, args, kwargs):
        x, rest = args[0], list(args[1:])
        dev = kwargs.get("device")
        for i, a in enumerate(rest):
            if _is_device(a):
                dev = a
                rest[i] = "cpu"
            elif isinstance(a, torch.Tensor):  # .to(other): its device and dtype
                dev = CUDA if self.is_marked(a) else a.device
                rest[i] = a.dtype
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        out = func(x, *rest, **kwargs)
        if _is_cuda(dev) or (dev is None and self.is_marked(x)):
            if self.is_marked(x) and out is x:  # already there: x itself, as on CUDA
                return out
            return self.mark(out.clone() if out is x else out)  # to the device: a copy
        return out.clone() if out is x and self.is_marked(x) else out  # to the CPU: a copy

    def _check(self, func, name, args, leaves) -> None:
        if func in _SHAPE_ONLY or func in _COPIES:
            return
        if func in _INDEXING:
            self_marked = self.is_marked(args[0])
            index = tree_flatten(args[1])[0]
            if not self_marked:
                if any(self.is_marked(i) for i in index):
                    raise RuntimeError(f"{name}: cuda indices of a cpu tensor (fake_cuda)")
                value = args[2] if len(args) > 2 else None
                if self.is_marked(value):
                    raise RuntimeError(f"{name}: a cuda value into a cpu tensor (fake_cuda)")
                return
            if func is torch.Tensor.__setitem__ and len(args) > 2:
                value = args[2]
                advanced = any(isinstance(i, torch.Tensor) for i in index)
                if advanced and isinstance(value, torch.Tensor) and not self.is_marked(value):
                    if value.dim() > 0:
                        raise RuntimeError(f"{name}: cpu values put into cuda (fake_cuda)")
            return
        plain = [
            x
            for x in leaves
            if isinstance(x, torch.Tensor) and not self.is_marked(x) and x.dim() > 0
        ]
        if plain:
            raise RuntimeError(
                f"{name}: expected all tensors on one device, got cuda and cpu "
                f"(a cpu tensor of shape {tuple(plain[0].shape)}; fake_cuda)"
            )
