"""The engine: FLUX.2 pipelines on diffusers, turning a ``GenerationRequest`` into a ``GenerationResult``."""

from fluxserve.engine.pipeline import Engine, engines_for, serving_devices
from fluxserve.engine.weights import WeightsNotFound

__all__ = ["Engine", "WeightsNotFound", "engines_for", "serving_devices"]
