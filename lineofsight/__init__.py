"""lineofsight: linear probes, steering and multimodal SAEs for LLaVA-style models.

The library is small on purpose: ``models`` (load a model, find its layers, prompt formats),
``hooks`` (Trace / TraceDict), ``run`` (the lifecycle every script shares: set-up, output
folder, lock, run record), ``dist`` (python or torchrun), ``cli`` (one error path),
``prompts`` (every prompt, once), ``data`` (datasets), one home per artifact format (``cache``
for activation caches, ``steering`` for vectors and rollouts, ``probes`` for probe weights,
``sae`` for SAEs) and ``toy`` (the embedded shape world and its evaluation). Experiments live
in the single-file scripts under ``probes/``, ``steering/`` and ``sae/``.
"""
