"""Trace and TraceDict: read and edit module inputs/outputs during a forward pass.

The surface is baukit's ``nethook`` (``Trace(module, layer=None, retain_output,
retain_input, clone, detach, retain_grad, edit_output, stop)``, ``TraceDict(module, layers,
...)``, ``StopForward``), which researchers know and the paper's code was written against;
baukit itself is not on PyPI, so this is the project's own implementation on plain torch
forward hooks. Code written for baukit runs unchanged with
``from lineofsight.hooks import Trace, TraceDict`` (``tests/test_hooks.py`` executes such a
snippet) as long as it stays clear of the differences listed below.

Guarantees:

- Every module is resolved before any hook is registered: a bad name raises ``LookupError``
  (with close matches) and leaves the model untouched.
- Hooks are removed on exit of the ``with`` block, also when the block raises.
- ``.output`` is a tensor for every module: decoder blocks return a tensor in transformers 5
  and a tuple in older releases (other modules, e.g. attention, still return tuples).
- ``stop=True`` ends the forward pass (by raising :class:`StopForward`, which the context
  manager swallows) as soon as every traced module has done what was asked; nothing after
  the traced modules runs.

Which module: ``layer`` is a dotted name (``"model.language_model.layers.3"``), ``None``
(``module`` itself: ``Trace(block, retain_output=True)``) or a module object inside
``module``. Everything is stored under the resolved dotted name: ``Trace.layer``, the
``layer`` an editor receives and the keys of a :class:`TraceDict` (``""`` for ``module``
itself).

Editors are called the way baukit calls them: ``edit_output`` may take any of ``output``
(the hidden-state tensor), ``layer`` (the resolved name) and ``inputs`` (the tuple of the
module's positional arguments). Parameters with one of these names get that value; the
other positional parameters, defaulted ones included, get the values left over, in the
order output, layer, inputs; ``**kwargs`` gets whatever is still left, by name (``*args``,
by position, when there is no ``**kwargs``). So ``fn(x)``, ``fn(x, name)``,
``fn(output, inputs)`` and ``fn(layer, output)`` all do what they say. As in baukit, a
positional parameter with a default is filled too: ``lambda out, v=v: ...`` receives the
layer name as ``v``; capture ``v`` in a closure or make it keyword-only (``*, v=v``).
``edit_input`` binds ``input`` and ``layer`` by the same rule.

Differences from baukit (everything else behaves the same):

1. **Tensors, not tuples.** For a module that returns a tuple, ``.output`` is its first
   element (the hidden states), ``edit_output`` receives that tensor and must return a
   tensor (anything else raises ``TypeError``), and the rest of the tuple is passed
   through; ``.raw_output`` holds the full value the rest of the model saw. baukit retains
   and edits the whole tuple, so a baukit editor that indexes ``output[0]`` of a
   tuple-returning module would index the *batch* here. For modules that return a tensor
   (transformers 5 decoder blocks, norms, linear layers) the two agree.
2. **Inputs.** ``.input`` is the first positional argument, or the ``hidden_states``
   keyword when the caller passed it by name; baukit keeps the positional tuple when there
   is more than one. It is taken in a pre-hook, before the module runs (after
   ``edit_input``); baukit takes it after the module ran, which differs only for a module
   that changes its input in place.
3. **When stop fires.** A trace that needs only the input stops in the pre-hook, before the
   module runs (baukit always runs the module). A ``TraceDict`` stops once *every* traced
   module is done, in whatever order the model calls them; baukit stops after the *last
   listed* layer, even if a listed layer that runs later has not run yet.
4. **Names.** ``layer=None`` (or ``module`` itself) is named ``""``, where baukit's
   ``Trace.layer`` and editor argument are ``None``. Module objects are accepted in
   ``TraceDict``'s ``layers`` and as ``Trace``'s ``layer`` (baukit takes a module only as
   the first argument); keys are always the resolved names.
5. **Binding edge cases.** ``**kwargs`` receives the leftover values (baukit passes them
   only when the function also has ``*args``); ``*args`` receives them by position (baukit
   passes them as keywords); an editor with a required parameter that cannot be filled
   raises ``TypeError`` when the trace is created, not during the forward pass; a callable
   without a signature (some builtins) gets the output alone.
6. **Per-layer options.** ``TraceDict`` takes ``{layer: value}`` for ``retain_output``,
   ``retain_input``, ``clone``, ``detach``, ``retain_grad``, ``edit_output`` and
   ``edit_input`` like baukit (unlisted layers get ``False`` / ``None``), keyed by names or
   modules. Unlike baukit, a key that is not a traced layer raises ``KeyError``, a dict
   for ``stop`` raises ``TypeError``, and so does a dict given to ``Trace``; baukit
   ignores the unknown key and treats the other dicts as ``True``.
7. **retain_grad** also applies to the retained input (baukit: output only). When the
   value does not require grad (frozen model, input without grad) the trace retains a
   detached copy that does (baukit sets ``requires_grad`` on the module's own output);
   in both, a clone of the retained tensor goes downstream, so ``.grad`` is filled by
   ``backward()`` and later in-place operations cannot touch it. ``detach=True`` with
   ``retain_grad=True`` raises ``ValueError`` (baukit keeps the graph and ignores
   ``detach`` for the output).
8. **Nested values.** ``clone`` / ``detach`` / ``retain_grad`` act on tensors; other values
   (e.g. a ``ModelOutput``) are retained by reference (baukit copies into dicts, lists and
   tuples).
9. **No leaks.** A bad name in ``TraceDict`` leaves no hook behind (baukit keeps the hooks
   of the layers before it registered).
10. **Only the tracing API.** ``Trace``, ``TraceDict`` and ``StopForward``; baukit's other
    helpers (``get_module``, ``subsequence``, ``set_requires_grad``, ...) are not provided.

Beyond baukit: ``edit_input`` edits the input (the project reads and edits the residual
stream at the *input* of block ``layer``; see :mod:`lineofsight.models`); ``.raw_output``;
:func:`resolve_modules`; and :func:`fork_batch`, which continues one forward pass from a
block on several edited copies of its input at once (CE loss recovered needs seven such
passes).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["StopForward", "Trace", "TraceDict", "fork_batch", "resolve_modules"]

Editor = Callable[..., torch.Tensor]
Layer = str | nn.Module | None
"""A traced module: a dotted name, a module object inside the model, or ``None`` (the model)."""
T = TypeVar("T")
PerLayer = T | Mapping[str | nn.Module, T]
"""One value for every layer of a :class:`TraceDict`, or ``{layer: value}``."""

# What editors can ask for, in the order unnamed positional parameters receive them.
_OUTPUT_ARGS = ("output", "layer", "inputs")
_INPUT_ARGS = ("input", "layer")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by the trace with ``stop``."""


def _name_of(model: nn.Module, layer: Layer) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of one layer of ``model`` (see :data:`Layer`)."""
    if layer is None:
        return "", model
    if isinstance(layer, nn.Module):
        for name, candidate in model.named_modules():
            if candidate is layer:
                return name, candidate
        raise LookupError(
            f"the {type(layer).__name__} passed as layer is not a submodule of {type(model).__name__}"
        )
    if not isinstance(layer, str):
        raise TypeError(f"a layer is a dotted name, a module or None, not {type(layer).__name__}")
    try:
        return layer, model.get_submodule(layer)
    except AttributeError:
        close = difflib.get_close_matches(layer, [n for n, _ in model.named_modules()], n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LookupError(f"no module named {layer!r} in {type(model).__name__}{hint}") from None


def resolve_modules(model: nn.Module, layers: Iterable[Layer]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every layer, or ``LookupError`` naming the first unknown one."""
    return [_name_of(model, layer) for layer in layers]


def _bind(fn: Callable[..., Any], names: tuple[str, ...]) -> Callable[..., Any]:
    """``call(*values)``: calls ``fn`` with ``values`` (one per entry of ``names``) bound by
    parameter name, then by position (the rule in the module docstring, baukit's).

    The binding is worked out once, here, so that a hook called on every forward pass (every
    generated token) does no signature inspection; a parameter that cannot be filled raises
    ``TypeError`` now rather than in the middle of a forward pass.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # e.g. some builtins: there is no name to bind by
        return lambda *values: fn(values[0])
    label = getattr(fn, "__qualname__", repr(fn))
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
    named = {p.name for p in positional + keyword_only if p.name in names}
    leftover = [i for i, name in enumerate(names) if name not in named]

    # Per positional parameter: the index of its value, or -1 to pass its default.
    sources: list[int] = []
    defaults: list[Any] = []
    for p in positional:
        if p.name in named:
            sources.append(names.index(p.name))
        elif leftover:
            sources.append(leftover.pop(0))
        elif p.default is not p.empty:
            sources.append(-1)
        else:
            raise TypeError(f"editor {label}() has parameter {p.name!r} but is only given {', '.join(names)}")
        defaults.append(p.default)
    missing = [p.name for p in keyword_only if p.name not in named and p.default is p.empty]
    if missing:
        raise TypeError(f"editor {label}() has keyword-only {missing} but is only given {', '.join(names)}")
    by_keyword = {names.index(p.name): p.name for p in keyword_only if p.name in named}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        by_keyword.update({i: names[i] for i in leftover})
        extra: list[int] = []
    elif any(p.kind == p.VAR_POSITIONAL for p in params):
        extra = leftover
    else:
        extra = []

    def call(*values: Any) -> Any:
        args = [values[i] if i >= 0 else default for i, default in zip(sources, defaults)]
        args += [values[i] for i in extra]
        return fn(*args, **{name: values[i] for i, name in by_keyword.items()})

    return call


def _keep(value: Any, clone: bool, detach: bool, retain_grad: bool) -> tuple[Any, Any]:
    """``(retained, passed_on)``: what the trace keeps, and what replaces ``value`` in the
    forward pass (``None``: ``value`` goes on unchanged)."""
    if not isinstance(value, torch.Tensor):
        return value, None
    if retain_grad:
        if value.requires_grad:
            kept = value.clone() if clone else value
            kept.retain_grad()  # a no-op on a leaf, which keeps its .grad anyway
        else:
            # Frozen model, input without grad: there is no graph to retain a gradient on, so
            # retain a leaf that requires grad and compute the rest of the forward from it.
            kept = (value.clone() if clone else value.detach()).requires_grad_(True)
        # Downstream gets a copy (as in baukit), so its in-place ops neither change the
        # retained tensor nor hit a leaf that requires grad.
        return kept, kept.clone()
    if clone:
        value = value.clone()
    if detach:
        value = value.detach()
    return value, None


def _edited(result: Any, before: Any, what: str, layer: str) -> Any:
    # A baukit editor written for a tuple-returning module returns a tuple; say why it fails
    # here instead of letting a tuple travel on as the hidden states.
    if isinstance(before, torch.Tensor) and not isinstance(result, torch.Tensor):
        raise TypeError(
            f"{what} for {layer!r} returned {type(result).__name__}, not a tensor: it receives and "
            "returns the hidden-state tensor, also for modules that return a tuple (see lineofsight.hooks)"
        )
    return result


class Trace:
    """Trace one module during a forward pass (context manager).

    Args:
        module: the model (or any module containing ``layer``).
        layer: the module to trace: a dotted name (``residual_site(model, 8)``), a module
            object inside ``module``, or ``None`` for ``module`` itself.
        retain_output: keep the module's output (hidden-state tensor) in ``.output``.
        retain_input: keep its input (first positional / ``hidden_states``) in ``.input``.
        clone: clone retained tensors (needed when a later in-place op would change them).
        detach: detach retained tensors from the autograd graph.
        retain_grad: retained tensors get ``.grad`` on ``backward()``, also in a frozen model.
        edit_output: ``fn(output[, layer][, inputs]) -> output``, bound by parameter name
            first (module docstring).
        edit_input: ``fn(input[, layer]) -> input``, bound the same way.
        stop: end the forward pass once this module is done (see module docstring).

    Example::

        with Trace(model, residual_site(model, 8), retain_input=True, stop=True) as tr:
            model(**inputs)
        resid_BTD = tr.input
    """

    def __init__(
        self,
        module: nn.Module,
        layer: Layer = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Editor | None = None,
        edit_input: Editor | None = None,
        stop: bool = False,
    ) -> None:
        options = dict(retain_output=retain_output, retain_input=retain_input, clone=clone, detach=detach,
                       retain_grad=retain_grad, edit_output=edit_output, edit_input=edit_input, stop=stop)
        dicts = [key for key, value in options.items() if isinstance(value, Mapping)]
        if dicts:  # a dict is truthy: taking it as True would silently retain/edit everything
            raise TypeError(f"Trace traces one module; per-layer dicts ({', '.join(dicts)}) need TraceDict")
        if detach and retain_grad:
            raise ValueError("detach=True cuts the graph that retain_grad=True needs; pass one of them")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        name, target = _name_of(module, layer)
        self.layer = name
        self.stop = stop
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.raw_output: Any = None
        self._opts = (bool(clone), bool(detach), bool(retain_grad))
        self._retain_input, self._retain_output = bool(retain_input), bool(retain_output)
        self._edit_input = _bind(edit_input, _INPUT_ARGS) if edit_input is not None else None
        self._edit_output = _bind(edit_output, _OUTPUT_ARGS) if edit_output is not None else None
        # Stop in the pre-hook when nothing of the module's own output is wanted.
        self._stop_early = bool(stop) and not (retain_output or edit_output)
        self._on_done: Callable[[str], None] | None = None
        try:
            if retain_input or edit_input is not None or self._stop_early:
                self._handles.append(target.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            if retain_output or edit_output is not None or (stop and not self._stop_early):
                self._handles.append(target.register_forward_hook(self._post_hook))
        except BaseException:
            self.close()
            raise

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        by_keyword = not args and "hidden_states" in kwargs
        value = kwargs["hidden_states"] if by_keyword else (args[0] if args else None)
        changed = False
        if self._edit_input is not None:
            value = _edited(self._edit_input(value, self.layer), value, "edit_input", self.layer)
            changed = True
        if self._retain_input:
            self.input, passed = _keep(value, *self._opts)
            if passed is not None:
                value, changed = passed, True
        if self._stop_early:
            self._done()
        if not changed:
            return None
        if by_keyword:
            return args, {**kwargs, "hidden_states": value}
        return (value, *args[1:]), kwargs

    def _post_hook(self, _module: nn.Module, args: tuple, output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        value = output[0] if is_tuple else output
        changed = False
        if self._edit_output is not None:
            value = _edited(self._edit_output(value, self.layer, args), value, "edit_output", self.layer)
            changed = True
        if self._retain_output:
            self.output, passed = _keep(value, *self._opts)
            if passed is not None:
                value, changed = passed, True
        new_output = ((value, *output[1:]) if is_tuple else value) if changed else None
        if self._retain_output:
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
        return bool(self.stop) and exc_type is not None and issubclass(exc_type, StopForward)


def _per_layer(model: nn.Module, names: list[str], option: str, value: Any, off: Any) -> dict[str, Any]:
    """``{name: value}`` for every traced name, from one value or a ``{layer: value}`` dict."""
    if not isinstance(value, Mapping):
        return dict.fromkeys(names, value)
    chosen = dict.fromkeys(names, off)
    for key, layer_value in value.items():
        name = key if isinstance(key, str) else _name_of(model, key)[0]
        if name not in chosen:
            raise KeyError(f"{option} has an entry for {key!r}, which is not among the traced layers {names}")
        chosen[name] = layer_value
    return chosen


class TraceDict(OrderedDict):
    """Trace several modules at once; ``td[name]`` is the :class:`Trace` of ``name``.

    ``layers`` are dotted names, module objects inside ``module`` or ``None`` (``module``
    itself); the keys are always the resolved dotted names (``""`` for ``module`` itself),
    in the order given, duplicates dropped. Every option is one value for all layers or a
    ``{layer: value}`` dict (layers left out get ``False`` / ``None``), except ``stop``: with
    ``stop=True`` the forward pass ends once every traced module has run, in whatever order
    the model calls them. One editor can serve several layers: it receives ``layer``.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[Layer],
        retain_output: PerLayer[bool] = True,
        retain_input: PerLayer[bool] = False,
        clone: PerLayer[bool] = False,
        detach: PerLayer[bool] = False,
        retain_grad: PerLayer[bool] = False,
        edit_output: PerLayer[Editor | None] = None,
        edit_input: PerLayer[Editor | None] = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(layers, (str, nn.Module)):  # a lone name would be traced letter by letter
            raise TypeError("TraceDict takes a list of layers; use Trace for one")
        if isinstance(stop, Mapping):
            raise TypeError("stop cannot be per-layer: the forward pass ends once every traced module is done")
        names = list(dict.fromkeys(name for name, _ in resolve_modules(module, layers)))  # all first
        options = {
            key: _per_layer(module, names, key, value, off)
            for key, value, off in [
                ("retain_output", retain_output, False),
                ("retain_input", retain_input, False),
                ("clone", clone, False),
                ("detach", detach, False),
                ("retain_grad", retain_grad, False),
                ("edit_output", edit_output, None),
                ("edit_input", edit_input, None),
            ]
        }
        self.stop = stop
        self._pending: set[str] = set()
        try:
            for name in names:
                trace = Trace(module, name, stop=stop, **{key: per[name] for key, per in options.items()})
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
        return bool(self.stop) and exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def fork_batch(
    module: nn.Module, names: list[str], variants: Callable[[torch.Tensor], list[torch.Tensor]], rows: int | None = None
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

    ``rows``: each module in ``names`` runs its V * B rows ``rows`` at a time (every batch-shaped argument
    cut alike, the outputs concatenated), so only the V * B residual is V times a plain forward's, not the
    blocks' activations (attention, the MLP's wider hidden layer): the same numbers up to the rounding of
    smaller matrix products.
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

    def in_rows(forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            n = state["B"] * state["V"]
            if rows is None or n <= rows:
                return forward(*args, **kwargs)

            def cut(value: Any, lo: int) -> Any:
                if isinstance(value, tuple):
                    return tuple(cut(v, lo) for v in value)
                if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == n:
                    return value[lo : lo + rows]
                return value

            result, rest = None, None
            for lo in range(0, n, rows):  # each chunk's output goes straight into one [n, ...] tensor
                out = forward(*(cut(a, lo) for a in args), **{k: cut(v, lo) for k, v in kwargs.items()})
                if not isinstance(out, torch.Tensor):
                    if any(x is not None for x in out[1:]):
                        raise ValueError("fork_batch(rows=...) needs modules whose outputs are the hidden states alone")
                    out, rest = out[0], tuple(out[1:])
                if result is None:
                    result = out.new_empty(n, *out.shape[1:])
                result[lo : lo + len(out)] = out
                del out
            return result if rest is None else (result, *rest)

        return run

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for _, m in resolved]
    if rows is not None:
        for _, m in resolved:
            m.forward = in_rows(m.forward)  # an instance attribute over the class's method, removed below
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if rows is not None:
            for _, m in resolved:
                del m.forward
