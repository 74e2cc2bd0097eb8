"""The server's core: no gRPC, no protobuf, no I/O but checkpoint files.

errors (the domain's), spec and status (values), tensors, store and optimizers (parameters and
their updates; halves: a large tensor's update on both cores), clock (ranks, incarnations, leases, the min clock), ssp (the staleness rule), gate
(where waits park), bsp (staleness 0's buffer), history, run (orchestrates them), registry (all
runs, joins), snapshot and checkpoint (a run on disk and back).
"""
