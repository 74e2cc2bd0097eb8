"""Worker conformance suite: any worker implementation, checked against a real ps-server.

A package (this file) so that its conftest is imported as ``conformance.conftest`` and does not
shadow ``tests/conftest.py``, which other test directories import as ``conftest``.
"""
