"""microbatch-overlap: declarative microbatch overlap scheduling for MoE inference.

The pipeline: a layer's ops graph (``overlap.ops_graph``) and a batch are turned into a plan
(``overlap.plan``) that the simulator and the execution backends both run. Importing this
package never imports torch.
"""

from overlap.errors import (
    ConfigError,
    GraphError,
    MissingDependencyError,
    OutputError,
    OverlapError,
    PlanError,
)
from overlap.ops_graph import (
    Collective,
    Comm,
    Graph,
    GraphBuilder,
    ModelGraph,
    Op,
    OpKind,
    Role,
    Shape,
    graph_of,
    op,
)

__version__ = "0.1.0"

__all__ = [
    "Collective",
    "Comm",
    "ConfigError",
    "Graph",
    "GraphBuilder",
    "GraphError",
    "MissingDependencyError",
    "ModelGraph",
    "Op",
    "OpKind",
    "OutputError",
    "OverlapError",
    "PlanError",
    "Role",
    "Shape",
    "__version__",
    "graph_of",
    "op",
]
