"""The HTTP API: one FastAPI app, a router per dialect (fal, OpenAI, Replicate), files, health and metrics."""
