"""Kernel tests run Triton in its interpreter, on CPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
can import a Triton module of the package (the package imports them only on the first Triton call).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

TRITON_MODULES = ("dcvg_kernels.conv3d", "dcvg_kernels.conv3d_backward", "dcvg_kernels.flash_attention")
_early = [m for m in TRITON_MODULES if m in sys.modules]
if _early:
    raise RuntimeError(f"{_early} imported before TRITON_INTERPRET was set: their kernels would not run on CPU")
