"""Suite-wide settings.

* One torch thread per xdist worker (2 workers on 2 cores).
* Triton runs in its interpreter on machines without CUDA. Triton reads TRITON_INTERPRET when a
  `@triton.jit` function is decorated, including triton.language's own helpers at `import triton`,
  so it is set here, before any test module (or a library it imports) can import triton.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import io
import sys

import pytest


class _ClosedPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.fixture
def close_stdout(monkeypatch):
    """Call it in the test body (capture resets sys.stdout between setup and call): stdout becomes a
    pipe whose reader has gone (`cli ... | head`), every write raising BrokenPipeError."""
    return lambda: monkeypatch.setattr(sys, "stdout", _ClosedPipe())
