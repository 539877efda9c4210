"""PNI: industrial anomaly detection with position and neighbourhood information.

``pni.load_model(bundle)`` loads a model exported by ``export_model.py`` for prediction
(see :func:`pni.predict.load_model`); it is imported on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":
        from pni.predict import load_model

        return load_model
    raise AttributeError(f"module 'pni' has no attribute {name!r}")
