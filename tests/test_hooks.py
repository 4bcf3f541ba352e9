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
