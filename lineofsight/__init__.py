"""lineofsight: linear probes, steering and multimodal SAEs for LLaVA-style models.

The library is small on purpose: ``models`` (load a model, find its layers, prompts),
``hooks`` (Trace / TraceDict), ``dist`` (python or torchrun), ``cli`` (one error path)
and ``toy`` (the embedded default model and its synthetic world). Experiments live in
the single-file scripts under ``probes/``, ``steering/`` and ``sae/``.
"""
