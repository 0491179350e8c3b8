"""Where the Triton kernels can run: on CUDA tensors, or on CPU tensors under the Triton interpreter (tests)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors, one program at a time, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _fix_interpreter_scalar_index() -> None:
    """Let the Triton < 3.7 interpreter use a kernel's run-time integer arguments as Python ints under numpy >= 2.4.

    The interpreter holds every scalar argument as a numpy array of shape [1] and turns it into an int (for
    `range(0, n, BLOCK)` over a run-time bound, as our kernels loop) with `int(array)`, which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7 reads the element instead
    (triton-lang/triton#9172); on older versions do the same, by adding that one attribute to what the interpreter
    patches into `tl.tensor` for the duration of a launch. Compiled (CUDA) kernels are untouched.
    """
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return
    if version >= (3, 7):
        return
    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if (patch_lang_tensor is None or not hasattr(interpreter, "_LangPatchScope")  # the layout this patch knows
            or getattr(patch_lang_tensor, "fastdino_scalar_index", False)):
        return

    def patch_lang_tensor_with_scalar_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor_with_scalar_index.fastdino_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor_with_scalar_index


if interpreting():  # the interpreter is chosen when the kernels are defined, i.e. when this package is imported
    _fix_interpreter_scalar_index()
