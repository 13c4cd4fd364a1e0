"""SAS layers: ``SASLinear``, ``SASConv1d``, ``SASConv2d``, ``SASConv3d`` (defined in ``sas_compile.runtime.layers``)."""
from .runtime.layers import SAS_LAYERS, SASConv1d, SASConv2d, SASConv3d, SASLinear

__all__ = ["SASLinear", "SASConv2d", "SASConv1d", "SASConv3d", "SAS_LAYERS"]
