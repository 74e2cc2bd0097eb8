"""Several servers holding one run: a cluster (ps-server --cluster ADDR0,ADDR1,... --index I).

Server 0 owns membership: the run registry, Join, ranks, incarnations, leases, evictions, metrics
and events (``owner.ClusterOwner``, beside the control plane). Every server holds one shard of
every run, a ``core.shard.ShardRun`` on servers 1.. (a plain ``Run`` on server 0, which is also
the membership), and serves PushGradient and PullParams for it as a single server does: the
staleness bound, exactly-once and the optimizer are per shard, unchanged. The owner keeps every
shard's ranks as its own (``UpdateShard``, in order, and again whenever they differ), asks each
for its status every second, and fails a run whose shard fails or whose server stays silent
longer than --shard-timeout. Servers 1.. forward RunService and WorkerService calls to server 0
(``peers.forward``), so psctl and workers may talk to any of them.

Modules: ``messages`` converts the cluster's messages; ``shards`` is ClusterService's handlers on
every server; ``owner`` is server 0's side (runs, membership, status), with ``cuts`` (the
cluster's checkpoints), ``recovery`` (a run's roll back to a cut every server has) and
``deletions`` (those a server missed); ``peers`` is the gRPC link between servers (the only one
here that knows gRPC).
"""
