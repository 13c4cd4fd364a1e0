"""The per-layer plan of the analysis (defined in ``sas_compile.passes.plan``)."""
from .passes.plan import LayerPlan, Plan

__all__ = ["LayerPlan", "Plan"]
