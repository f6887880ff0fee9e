"""`--compile`: the model under torch.compile, with an eager fallback (one warning) if compiling fails."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("lowbit")


class CompiledModel(nn.Module):
    """`model` under torch.compile, falling back to eager with one warning if compiling fails.

    torch.compile compiles lazily, at the first call (and again on a recompile, e.g. when grad mode
    or shapes change); a failure there (no C++ compiler for inductor, an unsupported Python or op)
    raises a TorchDynamoException or trips one of the compiler's internal asserts (`_compiler_error`).
    The backward graph is compiled together with the forward one (functorch's
    `force_non_lazy_backward_lowering`), so its failures surface here too instead of in `loss.backward()`. After a failure every call runs `model` eagerly. A failed call changes no
    layer state (the Function never does; a layer commits after its call), except where a graph break
    let part of it run: for recipes that draw random numbers a layer's call counter may then have advanced
    once (its random streams shift by one call). QLinear's forward traces as one graph for every recipe
    (tests/test_compile.py): stochastic rounding's keys come from the layer's call counter buffer by tensor
    ops (lowbit.rng.Stream), with no torch.Generator.

    Calls and train()/eval() go to `model`; state_dict() and parameters() are `model`'s (save
    `model`, not this wrapper).
    """

    def __init__(self, model: nn.Module, backend: str | Callable = "inductor", **compile_kwargs):
        super().__init__()
        self.model = model
        self.failed: str | None = None
        try:
            compiled = torch.compile(model, backend=backend, **compile_kwargs)
        except Exception as e:  # torch.compile refuses up front (e.g. an unsupported Python version)
            compiled = None
            self._fall_back(e)
        self.__dict__["_compiled"] = compiled  # not a submodule: no duplicate parameters / state_dict keys

    def _fall_back(self, e: Exception) -> None:
        inner = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the backend's error
        text = str(inner).strip()
        self.failed = f"{type(inner).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        self.__dict__["_compiled"] = None
        log.warning("torch.compile failed (%s); running the model eagerly instead (same numbers, no speed-up)",
                    self.failed)

    def forward(self, *args, **kwargs):
        compiled = self.__dict__["_compiled"]
        if compiled is not None:
            try:
                with _eager_backward_compile():
                    return compiled(*args, **kwargs)
            except Exception as e:
                if not _compiler_error(e):
                    raise
                self._fall_back(e)
        return self.model(*args, **kwargs)


def _compiler_error(e: Exception) -> bool:
    """Whether e is the compiler's failure rather than the model's: a TorchDynamoException, or any error whose
    innermost frame is in torch's compiler (dynamo's internal asserts are plain AssertionErrors, e.g. "Global
    autocast state changed while dynamo tracing")."""
    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace("\\", "/") if tb is not None else ""
    return any(f"/torch/{m}/" in where for m in ("_dynamo", "_inductor", "_functorch"))


def _eager_backward_compile():
    import torch._functorch.config as fconf

    if "force_non_lazy_backward_lowering" in getattr(fconf, "_config", {}):
        return fconf.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_model(model: nn.Module, backend: str | Callable = "inductor", **compile_kwargs) -> CompiledModel:
    """torch.compile `model` (after convert) with an eager fallback; see CompiledModel."""
    return CompiledModel(model, backend, **compile_kwargs)
