"""Triton kernels for DC-VideoGen, each with a pure-torch reference and fallback.

`chunk_causal_conv3d` is the conv that dcae-v's kernel seam looks for; `attention` is the one
attention call dcvg-wan makes with `--attention triton`. Importing the package needs only torch:
the Triton modules are imported on the first Triton call.
"""

from dcvg_kernels.__about__ import __version__
from dcvg_kernels.ops import attention, attention_with_lse, chunk_causal_conv3d
from dcvg_kernels.reference import attention_reference, conv3d_reference

__all__ = [
    "__version__",
    "attention",
    "attention_reference",
    "attention_with_lse",
    "chunk_causal_conv3d",
    "conv3d_reference",
]
