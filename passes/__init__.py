"""FX passes, one rewrite or analysis per file (installed as ``sas_compile.passes``).

``pipeline.py`` holds the order; every pass is ``pass_(graph_module, plan, config) -> plan``.

Capture and the plan:
- ``capture.py``: symbolic_trace, else torch.export; the SWS capture policy; shape propagation.
- ``plan.py``: ``Plan`` / ``LayerPlan``, built once per model, independent of M; its text,
  dict and Graphviz forms.
- ``costs.py``: the one table of mult and parameter formulas (per op and method).

SAS:
- ``find_sas_layers.py``: every conv/linear call, eligibility and reasons, call sites grouped by
  their weight tensor (ties) (analysis).
- ``find_foldable_relus.py``: which SAS layers read a ReLU that folds into the projection, and
  which folds a module swap expresses (analysis).
- ``rewrite_layers_to_sas.py``: SAS layers, wide weights, folded ReLUs (rewrite); the same plan
  as a module swap in a copy of the user's model when nothing else changes.
- ``lower_sas_to_projection.py``: on GPU graphs, projection + cuBLAS/cuDNN as aten ops (lowering).

SWS:
- ``sws_width_model.py`` / ``sws_width_rules.py`` / ``tie_channel_widths.py``: which widths widen
  together (the width model, the per-op rule table, the entry point; analysed once, decided per M).
- ``widen_for_sws.py``: the sqrt(M)-wide network with 1:M masks (rewrite).
- ``sws_module_swaps.py``: that network put back into a copy of the user's model as module and
  parameter swaps, where the rewrite changed nothing else (rewrite).
- ``lower_sws_to_packed.py``: masked linears onto packed 1:M weights and ``sws_matmul`` (lowering).

Reports:
- ``propagate_symbolic_shapes.py``: layer shapes as formulas in the input sizes (analysis).
"""
