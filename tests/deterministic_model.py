"""A test plugin (load it with ``GECO_PLUGINS=deterministic_model`` and ``tests/`` on the path): an
MLP VAE that decodes its posterior mean, with no sampling noise, so that runs on different numbers of
processes can be compared example for example."""

from __future__ import annotations

from torch import Tensor

from geco_core import hookimpl
from geco_core.models import MLPVAE, Output


class DeterministicVAE(MLPVAE):
    """MLP VAE decoding the posterior mean (no noise); KL analytic, nats."""

    name = "test-deterministic-vae"

    def forward(self, x: Tensor, context: Tensor | None = None) -> Output:
        q = self.posterior(x)
        return Output(self.decoder(q.mu), q.kl_standard_normal())


@hookimpl
def geco_register_models(register):
    register(DeterministicVAE)
