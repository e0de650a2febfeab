"""fluxserve: a self-hosted FLUX.2 image-generation server speaking the fal, OpenAI and Replicate APIs."""

__version__ = "0.1.0"
