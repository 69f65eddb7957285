"""A stand-in for sgl-kernel on the lent GPU machine, for importing SGLang there.

sgl-kernel 0.4.10 (373 MB, built for torch 2.14) cannot be carried to the GPU machine (torch
2.11, 64 MiB per run, no network), and SGLang's modules import it at their top on CUDA. This
finder answers ``import sgl_kernel`` / ``sgl_kernel.*`` with modules whose every attribute is a
function that RAISES when called: SGLang imports, and any path that would run an sgl-kernel
kernel fails loudly instead of passing. The paths the GPU tests drive (SGLang's pools,
allocators, table building, its Triton attention kernels and FlashInfer's) do not call it.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class Missing:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name}: sgl-kernel is not on this machine (tests/gpu/sgl_kernel_stub.py)")

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
