"""Kernel tests run Triton in its interpreter, on CPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
can import `dcvg_kernels.conv3d` (the package imports that module only on the first Triton call).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

if "dcvg_kernels.conv3d" in sys.modules:
    raise RuntimeError("dcvg_kernels.conv3d was imported before TRITON_INTERPRET was set: its kernels "
                       "would not run on CPU")
