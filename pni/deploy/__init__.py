"""Running a trained model without PyTorch.

- :mod:`pni.deploy.onnx_export` (needs torch): a :class:`~pni.model.PNIModel` -> ``model.onnx``,
  one graph from the preprocessed images to the four maps and image scores.
- :mod:`pni.deploy.onnx_runtime` (numpy + onnxruntime only): loads ``model.onnx`` and scores
  preprocessed images (:func:`pni.data.images.input_array`).

Importing this package imports neither.
"""
