"""HTTP layer: the OpenAI API under /v1, the admin API under /admin, health checks."""
