"""lowbit: train language models in FP4/FP8 and compare recipes side by side.

`import lowbit` imports no torch: the public names are resolved on first use.
    lowbit.convert(model, "nvfp4")   lowbit.QLinear   lowbit.compare(["bf16", "fp4-paper"], base, out)
"""
from lowbit._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"convert": "nn", "QLinear": "nn", "compare": "comparison"})
