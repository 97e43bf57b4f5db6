"""metald: the host agent that runs microVMs for a multi-tenant platform."""

__version__ = "0.1.0"
