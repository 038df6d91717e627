"""The HTTP API: OpenAI-compatible text routes, /v1/predict for datacube surrogates, health, metrics, auth."""
