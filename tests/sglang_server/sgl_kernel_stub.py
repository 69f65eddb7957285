"""A stand-in for sgl-kernel where it cannot be installed, for running SGLang's own code there.

sgl-kernel 0.4.10 is a CUDA build (373 MB, for torch 2.14): on a CPU machine it fails to import
without ``libcuda.so.1``, and it cannot be carried to the lent GPU machine (torch 2.11, 64 MiB per
run, no network). SGLang's modules import it at their top (on a CPU with ``SGLANG_USE_CPU_ENGINE=1``:
``sglang/kernels/ops/kvcache/cache_move.py`` and the speculative-decoding helpers import its CPU
ops). This finder answers ``import sgl_kernel`` / ``sgl_kernel.*`` with modules whose every
attribute is a function that RAISES when called: SGLang imports, and any path that would run an
sgl-kernel kernel fails loudly instead of passing. The paths driven here do not call it: SGLang's
real server on a CPU (``torch_native`` and ``triton`` backends; on a CPU without AMX SGLang falls
back to torch for its CPU ops), and on the GPU SGLang's pools, allocators, table building, its
Triton attention kernels and FlashInfer's.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class Missing:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name}: sgl-kernel is not on this machine (tests/sglang_server/sgl_kernel_stub.py)")

    def __getattr__(self, name):  # sgl_kernel.scalar_type.scalar_types.uint4b8 and the like
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self.name}.{name}")


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self.__name__}.{name}")


class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> bool:
    """Put the finder first unless the real sgl-kernel imports. True when the stub is in use."""
    try:
        import sgl_kernel  # noqa: F401
        return False
    except Exception:
        sys.modules.pop("sgl_kernel", None)
    sys.meta_path.insert(0, Finder())
    return True
