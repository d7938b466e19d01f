"""Planning: split a batch into microbatches and schedule (microbatch, op) onto streams."""

from overlap.plan.batch import Batch, Request
from overlap.plan.deps import unordered_kv_reads
from overlap.plan.plan import Plan, Step, Stream, Wait
from overlap.plan.split import (
    MicroBatch,
    Piece,
    Split,
    agree,
    graph_cost,
    split,
    split_agreed,
    whole,
)
from overlap.plan.strategies import NAMED, STRATEGIES, Strategy, build_plan, get_strategy
from overlap.plan.validate import check_rank_symmetry, collective_order, validate

__all__ = [
    "NAMED",
    "STRATEGIES",
    "Batch",
    "MicroBatch",
    "Piece",
    "Plan",
    "Request",
    "Split",
    "Step",
    "Strategy",
    "Stream",
    "Wait",
    "agree",
    "build_plan",
    "check_rank_symmetry",
    "collective_order",
    "get_strategy",
    "graph_cost",
    "split",
    "split_agreed",
    "unordered_kv_reads",
    "validate",
    "whole",
]
