"""Errors the CLI reports as one line (exit 2), kept free of heavy imports: the light commands catch them without
importing torch. The modules that raise them (lora/data.py, lora/model.py) import them from here."""


class DataError(ValueError):
    """Bad training data; the message names the file, the line when there is one, and the fix."""


class BackendError(RuntimeError):
    """The requested hardware/quantization cannot run here; the message names what is missing."""
