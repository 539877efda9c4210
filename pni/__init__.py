"""PNI: industrial anomaly detection with position and neighbourhood information."""

__version__ = "0.1.0"
