"""Models, registered through the same ``geco`` hooks as any plugin's (``geco models`` lists them)."""

from __future__ import annotations

from geco_core.hookspecs import hookimpl
from geco_core.models.base import VAE, DiagonalGaussian, Output
from geco_core.models.convdraw import ConditionalConvDraw, ConvDraw
from geco_core.models.nvp import VAENVP, FlowPosterior
from geco_core.models.vae import MLPVAE, ConvVAE, GaussianVAE

__all__ = [
    "VAE",
    "GaussianVAE",
    "DiagonalGaussian",
    "Output",
    "ConvVAE",
    "MLPVAE",
    "ConvDraw",
    "ConditionalConvDraw",
    "VAENVP",
    "FlowPosterior",
]


@hookimpl
def geco_register_models(register):
    register(ConvVAE)
    register(MLPVAE)
    register(ConvDraw)
    register(ConditionalConvDraw)
    register(VAENVP)
