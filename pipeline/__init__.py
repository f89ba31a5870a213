"""Herald's core: settings, topics, serialization, publisher, router, sink runtime, CLI."""

__version__ = "0.1.0"
