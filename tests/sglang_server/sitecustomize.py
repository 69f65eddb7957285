"""Run at the start of every Python process whose ``PYTHONPATH`` holds this directory (SGLang's
server and the scheduler / detokenizer processes it spawns): the sgl-kernel stand-in
(``sgl_kernel_stub.py``; SGLang imports sgl-kernel's CPU ops, and the PyPI wheel is a CUDA build),
and the fault ``TSAN_PAGED_TEST_FAULT`` names, if any (``sglang_faults.py``)."""

import sgl_kernel_stub
import sglang_faults

sgl_kernel_stub.install()
sglang_faults.install_from_environment()
