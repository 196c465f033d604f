"""The execution layer: a model as a chain of shards, in this process or as Ray actors.

- `interface.Chain`: what every chain implements (calls, handles, progress, release) and the passes
  it chooses for many streams; `local.LocalChain` and `actors.RayChain` implement it.
- `executors`: `--executor` read once; `ray_runtime`: the one place Ray starts and stops.
- `session.Session`: a chain opened on a model, and what the driver knows of it.
- `shard.Shard`: one shard's blocks and the work it does; `passes`: what a stream asks of each block;
  `streams`: how streams go through the chain; `wire`, `offload`, `placement`: their mechanics.
"""
