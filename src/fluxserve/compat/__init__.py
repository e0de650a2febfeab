"""Helpers that point the official clients at a fluxserve server (``fluxserve.compat.fal.use(...)``)."""
