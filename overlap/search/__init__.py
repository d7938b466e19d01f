"""Search: the layer above the backends that picks a schedule by simulating candidates.

``space`` (what can be chosen: :class:`Choice`, and how one becomes a plan), ``evaluator`` (a
choice's simulated full-depth step time), ``choice`` (:func:`search`: the fastest point found),
``planner`` (:class:`Planner`: cached decisions per batch-shape bucket for one deployment) and
``scenario`` (a deployment and the simulated comparison of strategies on it). Everything here
needs hardware to score on; nothing below (``plan``, ``backends``) imports this package.
"""

from overlap.search.choice import SearchResult, require_hardware, search
from overlap.search.evaluator import templates_graphs
from overlap.search.planner import PlanCache, Planner, ShapeKey, bucket
from overlap.search.space import Choice, realise

__all__ = [
    "Choice",
    "PlanCache",
    "Planner",
    "SearchResult",
    "ShapeKey",
    "bucket",
    "realise",
    "require_hardware",
    "search",
    "templates_graphs",
]
