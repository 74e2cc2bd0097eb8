"""paramserver's wire contract: the generated stubs (``paramserver.v1``) and its Python helpers."""
