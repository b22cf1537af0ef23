# Reference checks only: lets timm (needed by the official DiT models.py) import without torchvision.
import importlib.abc, importlib.machinery, sys, types

class _Anything(type):
    def __getattr__(cls, name):
        return _Anything(name, (), {})

class _Module(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Module(spec.name); m.__version__ = "0.0"; return m
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
