"""tus: a Lightning experiment framework for data-scarce ultrasound image classification."""

__version__ = "0.1.0"
