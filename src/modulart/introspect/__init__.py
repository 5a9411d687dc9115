"""modulart.introspect: MoE introspection (Lo et al., arXiv 2406.18219), on every MoE layout.

Static analyses from a live model or straight from a safetensors checkpoint (streamed one layer at
a time): S1 expert similarity of flattened matrices, S2 of mean neurons, S3 neuron reordering,
S4 router rows vs experts, S5 PCA. Dynamic analyses by the two-stage protocol: D1 output
similarity, D2 output norm vs router score, D3 intermediate activation ratio, D4 routing maps.
:func:`report` puts the headline numbers per layer, depth trends and the last-layer outlier check
together; ``report.save(dir)`` / ``report.plot(dir)`` write arrays + JSON and PNG figures.
``options="reference"`` (an :class:`IntrospectOptions`) computes every analysis as the paper's
reference notebooks do, where they differ from modulart's defaults.

Example:
    >>> import torch
    >>> import modulart.introspect as mi
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> groups = {"": ExpertGroups(torch.arange(32) % 4, 4)}   # a dense FFN analysed as 4 experts
    >>> w = mi.weights(model, experts=groups, progress=False)
    >>> tuple(w.expert_similarity(matrix="act", level="neuron_mean").values.shape)
    (1, 4, 4)
"""

from modulart.introspect.checkpoint import CheckpointSource, DenseCheckpoint
from modulart.introspect.live import ModelSource
from modulart.introspect.options import IntrospectOptions
from modulart.introspect.reporting import Report, outlier_check, report
from modulart.introspect.routing_analysis import LayerRouting, NormScoreCorrelation, RoutingAnalysis, routing
from modulart.introspect.sources import MATRICES, LayerReader, WeightSource
from modulart.introspect.static import LayerWeightStats, ReorderResult
from modulart.introspect.weight_analysis import GateVsExperts, PCAResult, Similarity, Weights, weights

__all__ = [
    "MATRICES",
    "CheckpointSource",
    "DenseCheckpoint",
    "GateVsExperts",
    "IntrospectOptions",
    "LayerReader",
    "LayerRouting",
    "LayerWeightStats",
    "ModelSource",
    "NormScoreCorrelation",
    "PCAResult",
    "ReorderResult",
    "Report",
    "RoutingAnalysis",
    "Similarity",
    "WeightSource",
    "Weights",
    "outlier_check",
    "report",
    "routing",
    "weights",
]
