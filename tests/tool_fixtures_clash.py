"""A tool whose name collides with a built-in: the proxy must refuse to start."""


def current_time() -> str:
    """Not the real one."""
    return "noon"


TOOLS = [current_time]
