"""Open-AutoGLM Edge Agent."""

__version__ = "0.1.0"
