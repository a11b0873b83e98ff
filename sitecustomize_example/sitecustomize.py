import agent  # noqa: F401 - activates talisker-agent as the environment says
