"""PowerCLIP: CLIP pre-training with a powerset region-phrase alignment loss, as a reproducible workflow.

Modules: ``synthetic`` (embedded "shapes" dataset), ``fetch``/``download`` (raw shards), ``phrases``
(parse-tree phrases), ``regions``/``sam`` (region sources and the patch grid), ``csr`` (on-disk formats),
``shards`` (atomic shard I/O and per-stage statistics), ``datasets`` (shard lists).
"""

__version__ = "0.1.0"
