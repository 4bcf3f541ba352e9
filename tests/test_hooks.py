"""Trace / TraceDict: exact equalities with output_hidden_states, edits, stop, no leaks."""

from __future__ import annotations

import pytest
import torch
from conftest import images

from lineofsight.hooks import Trace, TraceDict, fork_batch
from lineofsight.models import (
    final_norm_name,
    format_prompt,
    image_token_mask,
    layer_names,
    n_layers,
    residual_site,
)

KINDS = ["next-mistral", "next-llama", "next-qwen2", "llava15"]


def _inputs(processor, sizes=((64, 64), (48, 80))):
    processor.tokenizer.padding_side = "left"
    prompt = format_prompt(processor, "What is shown in this image?")
    return processor(text=[prompt] * len(sizes), images=images(sizes), return_tensors="pt", padding=True)


def _hooks(model):
    """Snapshot of every forward (pre-)hook id, per module."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_trace_input_equals_hidden_states(tiny_models, kind):
    model, processor = tiny_models(kind)
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
    n = n_layers(model)
    assert len(ref) == n + 1
    sites = [residual_site(model, layer) for layer in range(n + 1)]
    assert sites[-1] == final_norm_name(model)
    with torch.no_grad(), TraceDict(model, sites, retain_input=True, retain_output=False) as td:
        model(**inputs)
    for layer in range(n):
        assert torch.equal(td[sites[layer]].input, ref[layer]), layer
        with torch.no_grad(), Trace(model, sites[layer], retain_input=True) as tr:
            model(**inputs)
        assert torch.equal(tr.input, ref[layer])
    # hidden_states[n] is transformers' *normed* last residual; the trace gives the raw one.
    norm = model.get_submodule(sites[-1])
    assert torch.equal(norm(td[sites[-1]].input), ref[n])


def test_trace_output_of_block_is_next_hidden_state(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
    names = layer_names(model)
    with torch.no_grad(), TraceDict(model, names[:-1]) as td:
        model(**inputs)
    for i, name in enumerate(names[:-1]):
        assert torch.equal(td[name].output, ref[i + 1])


def test_edit_zero_is_identity_and_edit_v_is_exact(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    layer = 1
    site = residual_site(model, layer)
    mask_BT = image_token_mask(inputs["input_ids"], model)
    with torch.no_grad():
        clean = model(**inputs, output_hidden_states=True)
        with Trace(model, site, edit_output=lambda out: out + torch.zeros_like(out)):
            zero = model(**inputs)
    assert torch.equal(zero.logits, clean.logits)

    v_D = torch.randn(clean.hidden_states[0].shape[-1])

    seen = []

    def add_v(x_BTD, name):
        seen.append(name)
        return x_BTD + mask_BT[..., None] * v_D

    prev = layer_names(model)[layer - 1]
    with torch.no_grad():
        with Trace(model, site, retain_input=True, retain_output=False, edit_input=add_v) as tr:
            edited_in = model(**inputs)
        # The same edit made on the output of the previous block gives the same logits.
        with Trace(model, prev, edit_output=add_v) as tr_prev:
            edited_out = model(**inputs)
    assert seen == [site, prev]  # the editor is told which module it edits
    assert torch.equal(tr.input, clean.hidden_states[layer] + mask_BT[..., None] * v_D)
    assert torch.equal(tr_prev.output, tr.input)
    assert torch.equal(edited_in.logits, edited_out.logits)
    # Causal: positions before the first image token are untouched, later ones change.
    first = int(mask_BT[1].float().argmax())
    assert torch.equal(edited_in.logits[1, :first], clean.logits[1, :first])
    assert not torch.allclose(edited_in.logits[1, first:], clean.logits[1, first:])


def test_tuple_output_handled():
    class Block(torch.nn.Module):
        def forward(self, x):
            return (x * 2, "extra")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    net = Net()
    x = torch.ones(2, 3)
    with Trace(net, "block", retain_input=True, edit_output=lambda out: out + 1) as tr:
        out = net(x)
    assert out[1] == "extra"
    assert torch.equal(out[0], torch.full((2, 3), 3.0))
    assert torch.equal(tr.output, out[0]) and torch.equal(tr.input, x)
    assert tr.raw_output[1] == "extra"


def test_clone_and_detach():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    x = torch.randn(4, 3, requires_grad=True)
    with Trace(lin, "0", detach=True) as tr:
        lin(x)
    assert not tr.output.requires_grad
    with Trace(lin, "0", clone=True) as tr_c, Trace(lin, "0") as tr_n:
        lin(x)
    assert tr_c.output.requires_grad
    assert tr_c.output.data_ptr() != tr_n.output.data_ptr()


@pytest.mark.parametrize("retain_output", [False, True])
def test_stop_runs_nothing_after_traced_layer(tiny_models, retain_output):
    model, processor = tiny_models("next-llama")
    inputs = _inputs(processor)
    names = layer_names(model)
    later = set(names[2:]) | {final_norm_name(model), "lm_head"}
    if not retain_output:
        later.add(names[1])  # input-only traces stop before the block itself runs
    ran = []
    probes = [
        model.get_submodule(name).register_forward_hook(lambda *a, name=name: ran.append(name))
        for name in sorted(later | {names[0], names[1]})
    ]
    try:
        with torch.no_grad():
            ref = model(**inputs, output_hidden_states=True).hidden_states
        ran.clear()
        result = "not assigned"
        with torch.no_grad(), Trace(model, names[1], retain_input=True, retain_output=retain_output,
                                    stop=True) as tr:
            result = model(**inputs)
    finally:
        for handle in probes:
            handle.remove()
    assert result == "not assigned"  # the forward pass was cut short
    assert names[0] in ran
    assert not later & set(ran), ran
    assert torch.equal(tr.input, ref[1])
    if retain_output:
        assert torch.equal(tr.output, ref[2])


def test_tracedict_stop_after_all_layers(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    names = layer_names(model)
    with torch.no_grad(), TraceDict(model, [names[1], names[0]], retain_input=True, stop=True) as td:
        model(**inputs)
    assert td[names[0]].input is not None and td[names[1]].output is not None


def test_no_hook_leaks(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    names = layer_names(model)
    before = _hooks(model)

    with torch.no_grad(), TraceDict(model, names, retain_input=True):
        assert _hooks(model) != before
        model(**inputs)
    assert _hooks(model) == before

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), TraceDict(model, names):
        model(**inputs)
        raise RuntimeError("boom")
    assert _hooks(model) == before

    def bad_edit(out):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"), torch.no_grad(), \
            Trace(model, names[0], edit_output=bad_edit):
        model(**inputs)
    assert _hooks(model) == before

    with pytest.raises(LookupError, match="no module named"):
        TraceDict(model, [names[0], "model.language_model.layerz.1"])
    assert _hooks(model) == before
    with pytest.raises(LookupError):
        Trace(model, "nope")
    assert _hooks(model) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [1, 3])
def test_fork_batch_equals_one_forward_per_variant(tiny_models, kind, layer):
    """One forward forked at block ``layer`` (or at the final norm, layer 3 of 3) into three
    edited copies gives each copy's own forward: left padding, mixed image sizes."""
    model, processor = tiny_models(kind)
    inputs = _inputs(processor, sizes=((64, 64), (48, 80), (100, 40)))
    site = residual_site(model, layer)
    names = layer_names(model)[layer:] or [site]
    shift = torch.randn(model.config.get_text_config().hidden_size)
    edits = [lambda h: h, lambda h: torch.zeros_like(h), lambda h: h + shift]
    with torch.no_grad():
        model(**inputs)  # transformers adds its own output-capturing hooks on a first forward
    before = _hooks(model)
    with torch.no_grad(), fork_batch(model, names, lambda h: [edit(h) for edit in edits]):
        forked = model(**inputs, use_cache=False).logits
    assert _hooks(model) == before
    forked = forked.unflatten(0, (len(edits), len(inputs["input_ids"])))
    for v, edit in enumerate(edits):
        with torch.no_grad(), Trace(model, site, retain_output=False, edit_input=edit):
            want = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(forked[v], want, rtol=1e-5, atol=1e-5)


def test_fork_batch_refuses_a_kv_cache(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    with torch.no_grad(), fork_batch(model, layer_names(model)[1:], lambda h: [h, h]), \
            pytest.raises(ValueError, match="use_cache=False"):
        model(**inputs, use_cache=True)


# ---- baukit compatibility ------------------------------------------------------------------------

# Written the way the paper's code is, against baukit's nethook; executed unchanged below with
# a stand-in ``baukit`` package whose ``nethook`` is lineofsight.hooks.
SEED_SNIPPET = '''
import torch
from baukit import nethook


def get_activations(model, inputs, layer_names):
    with torch.no_grad(), nethook.TraceDict(model, layer_names, retain_input=True,
                                            retain_output=False, stop=True) as td:
        model(**inputs)
    return {name: td[name].input for name in layer_names}


def steer(model, inputs, module, vector, alpha):
    def add_vector(output, layer):
        seen_layers.append(layer)
        if isinstance(output, tuple):  # older transformers: (hidden_states, ...)
            return (output[0] + alpha * vector,) + output[1:]
        return output + alpha * vector

    with torch.no_grad(), nethook.Trace(module, edit_output=add_vector):
        return model(**inputs).logits


seen_layers = []
acts = get_activations(model, inputs, layer_names)
with torch.no_grad():
    with nethook.TraceDict(model, layer_names) as outer:
        with nethook.Trace(model.get_submodule(layer_names[1]), retain_input=True) as inner:
            model(**inputs)
block_in, block_out = inner.input, inner.output
outer_out = {name: outer[name].output for name in layer_names}
steered = steer(model, inputs, model.get_submodule(layer_names[1]), vector, 4.0)
steered_attn = steer(model, inputs, model.get_submodule(layer_names[1]).self_attn, vector, 4.0)
stopped = "not run"
with torch.no_grad(), nethook.Trace(model, layer_names[1], stop=True) as tr:
    stopped = model(**inputs)
stop_out = tr.output
'''


def _fake_baukit(monkeypatch):
    import sys
    import types

    from lineofsight import hooks

    nethook = types.ModuleType("baukit.nethook")
    nethook.Trace, nethook.TraceDict, nethook.StopForward = hooks.Trace, hooks.TraceDict, hooks.StopForward
    baukit = types.ModuleType("baukit")
    baukit.nethook = nethook
    monkeypatch.setitem(sys.modules, "baukit", baukit)
    monkeypatch.setitem(sys.modules, "baukit.nethook", nethook)


def test_seed_style_baukit_code_runs_with_the_import_swapped(tiny_models, monkeypatch):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    names = layer_names(model)
    vector = torch.randn(model.config.get_text_config().hidden_size)
    _fake_baukit(monkeypatch)
    ns = {"model": model, "inputs": inputs, "layer_names": names, "vector": vector}
    exec(compile(SEED_SNIPPET, "<seed snippet>", "exec"), ns)

    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        with TraceDict(model, names, retain_input=True) as td:
            model(**inputs)
        with Trace(model, names[1], edit_output=lambda x: x + 4.0 * vector):
            steered = model(**inputs).logits
        with Trace(model, f"{names[1]}.self_attn", edit_output=lambda x: x + 4.0 * vector):
            steered_attn = model(**inputs).logits
    for i, name in enumerate(names):
        assert torch.equal(ns["acts"][name], hs[i]) and torch.equal(ns["acts"][name], td[name].input)
        assert torch.equal(ns["outer_out"][name], td[name].output)
    assert torch.equal(ns["block_in"], hs[1]) and torch.equal(ns["block_out"], hs[2])
    assert torch.equal(ns["steered"], steered) and not torch.equal(steered, model(**inputs).logits)
    assert torch.equal(ns["steered_attn"], steered_attn) and not torch.equal(steered_attn, steered)
    # Trace(module) traces the module itself; its layer is "" (baukit's None).
    assert ns["seen_layers"] == ["", ""]
    assert ns["stopped"] == "not run" and torch.equal(ns["stop_out"], hs[2])


class _Block(torch.nn.Module):
    def forward(self, x, scale):
        return x * scale


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        return self.block(x, 3.0) + 1


def _edit_output_with(fn):
    """What ``fn`` was given when used as ``edit_output`` of ``_Net().block``, as symbols."""
    net, x = _Net(), torch.ones(2)
    got = []

    def symbol(value):
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, x * 3.0)
            return "output"
        if isinstance(value, tuple):
            assert value[0] is x and value[1] == 3.0
            return "inputs"
        if value == 7:  # a parameter's own default
            return value
        assert value == "block"
        return "layer"

    def recording(*args, **kwargs):
        got.append(([symbol(a) for a in args], {k: symbol(v) for k, v in kwargs.items()}))
        [output] = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)]
        return output + 1

    with Trace(net, "block", edit_output=fn(recording)):
        out = net(x)
    assert torch.equal(out, x * 3.0 + 2)  # the edit was applied
    [call] = got
    return call


@pytest.mark.parametrize("fn, want", [
    (lambda r: lambda x: r(x), ["output"]),
    (lambda r: lambda output, layer: r(output, layer), ["output", "layer"]),
    (lambda r: lambda output, inputs: r(output, inputs), ["output", "inputs"]),
    (lambda r: lambda layer, output: r(layer, output), ["layer", "output"]),
    (lambda r: lambda inputs, x: r(x, inputs), ["output", "inputs"]),
    (lambda r: lambda x_BTD, name: r(x_BTD, name), ["output", "layer"]),  # the repo's own style
    (lambda r: lambda x, v=None: r(x, v), ["output", "layer"]),  # defaults are filled, as in baukit
    (lambda r: lambda a, layer, b, c=7: r(a, layer, b, c), ["output", "layer", "inputs", 7]),
    (lambda r: lambda output, d=7, *, layer: r(output, d, layer), ["output", "inputs", "layer"]),
    (lambda r: lambda *a: r(*a), ["output", "layer", "inputs"]),
])
def test_edit_output_binds_by_name_then_position(fn, want):
    assert _edit_output_with(fn) == (want, {})


def test_edit_output_keyword_binding():
    def kw_only(r):
        def f(output, *, inputs, unused=None):
            assert unused is None
            return r(output=output, inputs=inputs)
        return f

    def var_kw(r):
        def f(x, **kw):
            return r(x, **kw)
        return f

    assert _edit_output_with(kw_only) == ([], {"output": "output", "inputs": "inputs"})
    assert _edit_output_with(var_kw) == (["output"], {"layer": "layer", "inputs": "inputs"})


def test_editor_binding_errors_leave_no_hook():
    net = _Net()
    before = _hooks(net)
    with pytest.raises(TypeError, match="'extra'"):
        Trace(net, "block", edit_output=lambda output, layer, inputs, extra: output)
    with pytest.raises(TypeError, match="'scale'"):
        Trace(net, "block", edit_output=lambda output, *, scale: output)
    with pytest.raises(TypeError, match="'scale'"):
        TraceDict(net, ["", "block"], edit_input=lambda x, layer, scale: x)
    # baukit's tuple-style editor on our tensor output: a clear error, not a tuple downstream.
    with pytest.raises(TypeError, match="not a tensor"), Trace(net, "block", edit_output=lambda o: (o,)):
        net(torch.ones(2))
    assert _hooks(net) == before


def test_edit_input_binding():
    net, x = _Net(), torch.ones(2)
    got = []
    for fn in [lambda inp: got.append(("x",)) or inp + 1,
               lambda inp, name: got.append((name,)) or inp + 1,
               lambda layer, input: got.append((layer, input.shape)) or input + 1]:
        with Trace(net, "block", edit_input=fn):
            assert torch.equal(net(x), (x + 1) * 3.0 + 1)
    assert got == [("x",), ("block",), ("block", torch.Size([2]))]
    # Used without a signature (a builtin), the editor gets the value alone.
    with Trace(net, "block", edit_output=torch.neg):
        assert torch.equal(net(x), -x * 3.0 + 1)


def test_per_layer_dicts(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    names = layer_names(model)
    v = torch.randn(model.config.get_text_config().hidden_size)
    edited = []

    def add(x, layer):
        edited.append(layer)
        return x + v

    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        with Trace(model, names[1], edit_output=lambda x: x + v), Trace(model, names[2]) as ref:
            model(**inputs)
        with TraceDict(model, names, retain_output={names[0]: True, model.get_submodule(names[2]): True},
                       retain_input={names[1]: True}, edit_output={names[1]: add}) as td:
            model(**inputs)
    assert edited == [names[1]]
    assert torch.equal(td[names[0]].output, hs[1]) and td[names[0]].input is None
    assert td[names[1]].output is None and torch.equal(td[names[1]].input, hs[1])
    assert torch.equal(td[names[2]].output, ref.output)

    lin = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    with TraceDict(lin, ["0", "1"], detach={"0": True}, clone={lin[1]: True}) as td:
        lin(torch.randn(2, 3))
    assert not td["0"].output.requires_grad and td["1"].output.requires_grad

    before = _hooks(model)
    with pytest.raises(KeyError, match="layers.7"):
        TraceDict(model, names, retain_output={"model.language_model.layers.7": True})
    with pytest.raises(KeyError, match="not among the traced layers"):
        TraceDict(model, names[:2], edit_output={model.get_submodule(names[2]): add})
    with pytest.raises(TypeError, match="stop"):
        TraceDict(model, names, stop={names[0]: True})
    with pytest.raises(TypeError, match="TraceDict"):
        Trace(model, names[0], retain_output={names[0]: True})
    with pytest.raises(TypeError, match="list of layers"):
        TraceDict(model, names[0])
    with pytest.raises(ValueError, match="retain_grad"):
        TraceDict(model, names, detach={names[1]: True}, retain_grad=True)
    assert _hooks(model) == before


def test_module_objects_and_none_equal_names(tiny_models):
    model, processor = tiny_models("next-llama")
    inputs = _inputs(processor)
    names = layer_names(model)
    block = model.get_submodule(names[1])
    with torch.no_grad():
        plain = model(**inputs).logits
        with Trace(model, names[1], retain_input=True) as by_name, \
                Trace(model, block, retain_input=True) as by_module, \
                Trace(block, retain_input=True) as by_none, \
                Trace(block, "mlp") as mlp_by_name, Trace(block.mlp) as mlp_by_none, \
                TraceDict(model, [block, None, names[0], model.get_submodule(names[0])]) as td:
            model(**inputs)
    assert (by_name.layer, by_module.layer, by_none.layer) == (names[1], names[1], "")
    assert list(td) == [names[1], "", names[0]]
    for tr in (by_module, by_none, td[names[1]]):
        assert torch.equal(tr.output, by_name.output)
    assert torch.equal(by_module.input, by_name.input) and torch.equal(by_none.input, by_name.input)
    assert torch.equal(mlp_by_name.output, mlp_by_none.output)
    assert torch.equal(td[""].output.logits, plain)  # the model itself, its ModelOutput kept whole
    before = _hooks(model)
    with pytest.raises(LookupError, match="not a submodule"):
        TraceDict(model, [names[0], torch.nn.Linear(2, 2)])
    with pytest.raises(LookupError, match="not a submodule"):
        Trace(block, model.get_submodule(names[0]))
    assert _hooks(model) == before


def _manual_grad(model, inputs, name):
    """d(logits.sum())/d(output of ``name``) through a hand-written hook (the reference)."""
    kept = {}

    def hook(_module, _args, output):
        if not output.requires_grad:  # frozen model: start the graph here
            output = output.detach().requires_grad_(True)
        output.retain_grad()
        kept["h"] = output
        return output

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            model(**inputs).logits.sum().backward()
    finally:
        handle.remove()
    return kept["h"].grad


@pytest.mark.parametrize("frozen", [True, False])
def test_retain_grad(tiny_models, frozen):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor, sizes=((32, 32),))
    names = layer_names(model)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(not frozen)
        want = []
        for name in names[:2]:
            model.zero_grad(set_to_none=True)
            want.append(_manual_grad(model, inputs, name))
        embed_grad = model.get_input_embeddings().weight.grad
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            plain = model(**inputs).logits
        with torch.enable_grad(), TraceDict(model, names[:2], retain_grad=True,
                                            retain_input={names[1]: True}) as td:
            out = model(**inputs)
            out.logits.sum().backward()
        assert torch.equal(out.logits, plain)  # retaining does not change the forward
        for name, grad in zip(names[:2], want):
            assert td[name].output.grad is not None and torch.equal(td[name].output.grad, grad)
        # Block 1's input is block 0's output: the same gradient.
        assert torch.equal(td[names[1]].input.grad, want[0])
        if frozen:
            assert all(p.grad is None for p in model.parameters())
        else:  # the graph upstream of the traced blocks is intact
            assert torch.equal(model.get_input_embeddings().weight.grad, embed_grad)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_no_hook_leaks_with_module_objects(tiny_models):
    model, processor = tiny_models("next-mistral")
    inputs = _inputs(processor)
    block = model.get_submodule(layer_names(model)[0])
    before = _hooks(model)

    def bad_edit(output, layer):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"), torch.no_grad(), \
            Trace(block, retain_input=True, edit_output=bad_edit):
        model(**inputs)
    assert _hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), \
            TraceDict(model, [block, block.self_attn], retain_input={block: True}):
        model(**inputs)
        raise RuntimeError("boom")
    assert _hooks(model) == before
