"""paramserver's parameter server.

``core/``: the pure core, which knows nothing of gRPC or the wire (runs, ranks and clocks, the SSP
rule and gate, parameters and optimizers, the BSP buffer, snapshots and checkpoint files).
Around it, transport-neutral services: ``control`` (RunService, WorkerService) and ``dataplane``
(PushGradient, PullParams), with ``codec`` converting between the wire and the core. Their
transports are leaves: ``servicer`` (gRPC), ``tcp_plane`` (the TCP data plane), with ``security``.
``server`` wires everything; ``checkpointer`` decides when to checkpoint, ``metrics`` exports;
``testing`` runs the server in memory for tests of clients (the SDK's in-memory transport).
"""
