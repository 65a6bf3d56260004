"""prefixkv: LLaVA-class vision-language models with layer-adaptive KV-cache compression.

    import prefixkv
    m = prefixkv.Model("models/prefixkv-llava-tiny")
    print(m.generate("Describe the image.", image="data/example.png", policy="prefixkv:wov2:reduce=max", budget=0.2))

docs/PYTHON.md describes every function and option. Errors in the input are raised as
prefixkv.Error (a ValueError) carrying the engine's message.
"""
from ._core import (Error, Model, Profile, Stream, calibrate, evaluate, have_cuda, policies, set_threads,
                    threads)

__all__ = ["Error", "Model", "Profile", "Stream", "calibrate", "evaluate", "have_cuda", "policies", "set_threads",
           "threads"]

for _name in __all__:  # shown as prefixkv.Error, prefixkv.Model, ... rather than prefixkv._core.*
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
