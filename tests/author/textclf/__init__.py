"""A model package written the way the README's model-author section says,
outside python-worker/: what an ML engineer ships. The e2e tests serve it
through the gateway with `env = { PYTHONPATH = ... }`."""
