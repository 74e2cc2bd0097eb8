"""The one compiled part: the worker's push with its pull on the shared-memory data plane
(paramserver/_exchange.c). Optional: where it does not build (no C compiler, no Python headers),
the install goes on without it and the SDK uses its Python path (everything else is in
pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("paramserver._exchange", ["paramserver/_exchange.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"])])
