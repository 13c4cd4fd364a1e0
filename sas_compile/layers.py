"""SAS layers: ``SASLinear``, ``SASConv2d``, ``SASConv1d`` (defined in ``sas_compile.runtime.layers``)."""
from .runtime.layers import SAS_LAYERS, SASConv1d, SASConv2d, SASLinear

__all__ = ["SASLinear", "SASConv2d", "SASConv1d", "SAS_LAYERS"]
