"""The engine: FLUX.2 pipelines on diffusers, turning a ``GenerationRequest`` into a ``GenerationResult``."""

from fluxserve.engine.pipeline import Engine
from fluxserve.engine.weights import WeightsNotFound

__all__ = ["Engine", "WeightsNotFound"]
