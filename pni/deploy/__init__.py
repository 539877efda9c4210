"""Running a trained model for prediction, with PyTorch or without it.

- :mod:`pni.deploy.onnx_export` (needs torch): a :class:`~pni.model.PNIModel` -> ``model.onnx``,
  one graph from the preprocessed images to the four maps and image scores
  (``export_model.py --onnx``).
- :mod:`pni.deploy.onnx_runtime` (numpy + onnxruntime only): loads ``model.onnx`` and scores
  preprocessed images (:func:`pni.data.images.input_array`): ``--runtime onnxruntime``.
- :mod:`pni.deploy.torch_runtime` (torch): the bundle's :class:`~pni.model.PNIModel` behind
  the same numpy interface: ``--runtime torch``, the default.

Both runtimes take float32 arrays ``(N, 3, S, S)`` and give one :class:`~pni.maps.MapScores`
per image. Importing this package imports none of them.
"""
