"""modulart.emoe: emergent mixture-of-experts from dense FFNs (arXiv 2310.10908).

Split each chosen FFN's neurons into ``N`` balanced experts by clustering their key vectors, route
every token to its top-``k`` experts with a gate derived from the keys themselves (no new
parameters), fine-tune as usual, then ``to_dense()`` back to a stock dense model (which changes the
function unless ``top_k == num_experts``; ``merge_()``, which must preserve it, succeeds only then).

Example:
    >>> import torch, modulart as mt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    >>> handle = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all")
    >>> y = model(torch.randn(4, 8))
    >>> stats = next(iter(handle.routing_stats().values()))
    >>> stats.tokens, round(sum(stats.load), 6)
    (4, 1.0)
    >>> _ = handle.to_dense()

A router of your own is a function ``(x [T, d_model], context, config) -> scores [T, N]``
registered with :func:`register_router` and named in ``EMoEConfig(router=...)``.
"""

from modulart.emoe.cluster import balanced_kmeans, random_balanced_labels, within_cluster_cosine
from modulart.emoe.config import EMoEConfig, default_layers
from modulart.emoe.handle import EMoEHandle
from modulart.emoe.layer import ConvertedFFN, RoutingStats
from modulart.emoe.operator import EMoE, EMoEPlan, apply
from modulart.emoe.routing import (
    ExpertGroups,
    RouterContext,
    RouterFn,
    available_routers,
    get_router,
    register_router,
    unregister_router,
)

__all__ = [
    "ConvertedFFN",
    "EMoE",
    "EMoEConfig",
    "EMoEHandle",
    "EMoEPlan",
    "ExpertGroups",
    "RouterContext",
    "RouterFn",
    "RoutingStats",
    "apply",
    "available_routers",
    "balanced_kmeans",
    "default_layers",
    "get_router",
    "random_balanced_labels",
    "register_router",
    "unregister_router",
    "within_cluster_cosine",
]
