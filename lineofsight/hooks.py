"""Trace and TraceDict: read and edit module inputs/outputs during a forward pass.

The surface follows baukit's ``nethook`` (``retain_output``, ``retain_input``, ``clone``,
``detach``, ``edit_output``, ``stop``), which researchers know; baukit itself is not on
PyPI, so this is the project's own implementation on plain torch forward hooks.

Guarantees:

- Every module name is resolved before any hook is registered: a bad name raises
  ``LookupError`` and leaves the model untouched.
- Hooks are removed on exit of the ``with`` block, also when the block raises.
- Decoder blocks that return a tensor (transformers 5) and ones that return a tuple
  (older releases, other models) behave the same: ``.output`` is the hidden-state tensor
  (the tuple's first element) and ``edit_output`` receives and returns that tensor; the
  rest of the tuple is passed through untouched. The full return value is ``.raw_output``.
- ``.input`` is the first positional argument, or the ``hidden_states`` keyword when the
  caller passed it by name.
- ``stop=True`` ends the forward pass (by raising a private exception that the context
  manager swallows) as soon as every traced module has done what was asked: in the
  pre-hook when only the input is needed, after the module otherwise. Nothing after the
  traced modules runs.

Beyond baukit: ``edit_input=fn(input, name) -> input`` edits the input (the project reads
and edits the residual stream at the *input* of block ``layer``; see
:mod:`lineofsight.models`), and :func:`fork_batch` continues one forward pass from a block on
several edited copies of its input at once (CE loss recovered needs seven such passes).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["StopForward", "Trace", "TraceDict", "fork_batch", "resolve_modules"]

Editor = Callable[..., torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by the trace with ``stop``."""


def resolve_modules(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every name, or ``LookupError`` naming the first unknown one."""
    resolved = []
    all_names: list[str] | None = None
    for name in names:
        try:
            resolved.append((name, model.get_submodule(name)))
        except AttributeError:
            if all_names is None:
                all_names = [n for n, _ in model.named_modules()]
            close = difflib.get_close_matches(name, all_names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LookupError(f"no module named {name!r} in {type(model).__name__}{hint}") from None
    return resolved


def _n_positional(fn: Callable) -> int:
    """How many positional arguments ``fn`` accepts (2 for ``fn(x, name)``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _call_editor(fn: Editor, value: torch.Tensor, name: str, n_args: int) -> torch.Tensor:
    return fn(value, name) if n_args >= 2 else fn(value)


def _keep(value: torch.Tensor, clone: bool, detach: bool, retain_grad: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        return value
    if clone:
        value = value.clone()
    if detach:
        value = value.detach()
    if retain_grad and value.requires_grad:
        value.retain_grad()
    return value


class Trace:
    """Trace one module during a forward pass (context manager).

    Args:
        module: the model (or any module containing ``layer``).
        layer: dotted name of the module to trace, e.g. ``residual_site(model, 8)``.
        retain_output: keep the module's output (hidden-state tensor) in ``.output``.
        retain_input: keep its input (first positional / ``hidden_states``) in ``.input``.
        clone: clone retained tensors (needed when a later in-place op would change them).
        detach: detach retained tensors from the autograd graph.
        retain_grad: call ``retain_grad()`` on retained tensors.
        edit_output: ``fn(output)`` or ``fn(output, name)`` returning the new output tensor.
        edit_input: ``fn(input)`` or ``fn(input, name)`` returning the new input tensor.
        stop: end the forward pass once this module is done (see module docstring).

    Example::

        with Trace(model, residual_site(model, 8), retain_input=True, stop=True) as tr:
            model(**inputs)
        resid_BTD = tr.input
    """

    def __init__(
        self,
        module: nn.Module,
        layer: str,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Editor | None = None,
        edit_input: Editor | None = None,
        stop: bool = False,
    ) -> None:
        [(name, target)] = resolve_modules(module, [layer])
        self.layer = name
        self.stop = stop
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.raw_output: Any = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._opts = (clone, detach, retain_grad)
        self._retain_input, self._retain_output = retain_input, retain_output
        self._edit_input, self._edit_output = edit_input, edit_output
        self._n_edit_in = _n_positional(edit_input) if edit_input else 0
        self._n_edit_out = _n_positional(edit_output) if edit_output else 0
        # Stop in the pre-hook when nothing of the module's own output is wanted.
        self._stop_early = stop and not (retain_output or edit_output)
        self._on_done: Callable[[str], None] | None = None
        try:
            if retain_input or edit_input or self._stop_early:
                self._handles.append(target.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            if retain_output or edit_output or (stop and not self._stop_early):
                self._handles.append(target.register_forward_hook(self._post_hook))
        except BaseException:
            self.close()
            raise

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        by_keyword = not args and "hidden_states" in kwargs
        value = kwargs["hidden_states"] if by_keyword else (args[0] if args else None)
        changed = False
        if self._edit_input is not None:
            value = _call_editor(self._edit_input, value, self.layer, self._n_edit_in)
            changed = True
        if self._retain_input:
            self.input = _keep(value, *self._opts)
        if self._stop_early:
            self._done()
        if not changed:
            return None
        if by_keyword:
            return args, {**kwargs, "hidden_states": value}
        return (value, *args[1:]), kwargs

    def _post_hook(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        value = output[0] if is_tuple else output
        new_output = None
        if self._edit_output is not None:
            value = _call_editor(self._edit_output, value, self.layer, self._n_edit_out)
            new_output = (value, *output[1:]) if is_tuple else value
        if self._retain_output:
            self.output = _keep(value, *self._opts)
            self.raw_output = output if new_output is None else new_output
        if self.stop:
            self._done()
        return new_output

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done(self.layer)
        else:
            raise StopForward

    def close(self) -> None:
        """Remove this trace's hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return self.stop and exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict):
    """Trace several modules at once; ``td[name]`` is the :class:`Trace` of ``name``.

    Takes the same keyword options as :class:`Trace`, applied to every layer;
    ``edit_output`` / ``edit_input`` receive ``(tensor, name)`` so one function can edit
    several layers. With ``stop=True`` the forward pass ends once every traced module has
    run (in whatever order the model calls them).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[str],
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Editor | None = None,
        edit_input: Editor | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        resolved = resolve_modules(module, list(dict.fromkeys(layers)))  # all names first
        self.stop = stop
        self._pending: set[str] = set()
        try:
            for name, _ in resolved:
                trace = Trace(
                    module,
                    name,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    clone=clone,
                    detach=detach,
                    retain_grad=retain_grad,
                    edit_output=edit_output,
                    edit_input=edit_input,
                    stop=stop,
                )
                trace._on_done = self._mark_done
                self[name] = trace
        except BaseException:
            self.close()
            raise
        self._pending = set(self.keys())

    def _mark_done(self, name: str) -> None:
        self._pending.discard(name)
        if not self._pending:
            self._pending = set(self.keys())  # ready for the next forward pass
            raise StopForward

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for trace in self.values():
            trace.close()

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return self.stop and exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def fork_batch(
    module: nn.Module, names: list[str], variants: Callable[[torch.Tensor], list[torch.Tensor]]
) -> Iterator[None]:
    """Run the rest of a forward pass on several variants of one module's input at once.

    ``names`` are the modules from the fork point to the end of the stack, in call order: the
    decoder blocks ``layer..n-1`` (or the final norm alone). At the input of ``names[0]``,
    ``variants(h_BTD)`` returns V tensors shaped like ``h``; they are concatenated along the
    batch (variant-major), and every module in ``names`` gets the batch-sized tensors among its
    other arguments (attention mask, position ids, rotary embeddings) repeated to match. What
    runs before the fork point (vision tower, embedding, earlier blocks) runs once instead of V
    times, and the model's output has ``V * B`` rows: ``out.unflatten(0, (V, B))[v]`` is what a
    forward with ``h`` replaced by ``variants(h)[v]`` gives. A forward with a KV cache is refused:
    the cache would be filled for B rows by the early blocks and V * B by the late ones.
    """
    resolved = resolve_modules(module, names)
    first = resolved[0][1]
    state: dict[str, Any] = {}

    def expand(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(expand(v) for v in value)
        # Batch-shaped: [B, T, ...] (1-D tensors such as cache positions are not per row).
        if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == state["B"]:
            key = id(value)
            if key not in state["memo"]:  # the same mask / rotary tables reach every block
                # (the original is kept alongside, so that its id cannot be reused this forward)
                state["memo"][key] = (value, value.repeat(state["V"], *([1] * (value.dim() - 1))))
            return state["memo"][key][1]
        if value is not None and hasattr(value, "get_seq_length"):
            raise ValueError("fork_batch needs use_cache=False (a KV cache cannot change batch size midway)")
        return value

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            h, rest = args[0], args[1:]
        else:
            h, rest = kwargs.pop("hidden_states"), ()
        if mod is first:
            forks = list(variants(h))
            state.update(B=h.shape[0], V=len(forks), memo={})
            h = torch.cat(forks, 0)
        return (h, *(expand(a) for a in rest)), {k: expand(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for _, m in resolved]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
