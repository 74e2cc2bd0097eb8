"""paramserver's parameter server.

The core (no gRPC): ``errors``, ``spec``, ``optimizers``, ``store``, ``gate``, ``runs``.
The transport (the only modules that import grpc or the generated stubs): ``codec``,
``servicer``, ``server``. ``config`` is shared by both.
"""
