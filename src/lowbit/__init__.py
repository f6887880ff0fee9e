"""lowbit: train language models in FP4/FP8 and compare recipes side by side.

`import lowbit` imports no torch: the public names are resolved on first use.
    lowbit.convert(model, "nvfp4")   lowbit.QLinear   lowbit.compare(["bf16", "fp4-paper"], base, out)
"""


def __getattr__(name):
    if name in ("convert", "QLinear"):
        from lowbit import nn

        return getattr(nn, name)
    if name == "compare":
        from lowbit.comparison import compare

        return compare
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "convert", "QLinear", "compare"])
