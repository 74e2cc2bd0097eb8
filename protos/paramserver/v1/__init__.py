"""Generated stubs of paramserver.v1 (``python protos/generate.py``) and ``tensors``, the chunking rule."""
