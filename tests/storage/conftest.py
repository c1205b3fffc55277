"""The flow fixtures (tiny generated sources and config, a CLI subprocess's environment) for the store tests."""

from tests.flows.conftest import subprocess_env, tiny_config, tiny_sources  # noqa: F401 - pytest fixtures, re-exported
