"""ps-worker: joins the cluster, pulls parameters, computes gradients on its data shard, pushes them."""
