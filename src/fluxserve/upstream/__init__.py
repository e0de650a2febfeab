"""Clients for other providers' APIs (fal, Replicate), used as routes by the gateway (``fluxserve.upstream.gateway``):
closed models served by their providers behind fluxserve's own dialects, with fallback between routes."""
