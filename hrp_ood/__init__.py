"""hrp-ood: Holistic Reliability Propagation for noisy labels, and what label noise does to OOD detection."""

__version__ = "0.1.0"
