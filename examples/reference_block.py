"""Run the reference DeepSeek block under an overlap plan and check it against the plain forward.

    python examples/reference_block.py [--strategy deepseek_prefill] [--backend threads]

Builds a 3-layer tiny DeepSeek-V3-shaped model (one dense layer, two MoE layers), a mixed batch
(a prompt, two decodes, a chunked prefill), splits it in two, plans it, runs the plan on worker
threads and compares every output tensor with the unsplit forward, bit for bit.
"""

from __future__ import annotations

import argparse
import time

import torch

from overlap.backends import Executor
from overlap.plan import STRATEGIES, Batch, build_plan, split
from overlap.reference import TINY, ReferenceModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="deepseek_prefill", choices=sorted(STRATEGIES))
    parser.add_argument("--backend", default="threads", choices=["inline", "threads"])
    parser.add_argument("--attention", default="one", choices=["one", "two_stage", "fine"])
    args = parser.parse_args()

    model = ReferenceModel(TINY, num_layers=3)
    batch = Batch.of([(6, 0), (1, 5), (4, 3), (1, 2)])  # (query_len, context_len) per request
    contexts = {1: 5, 2: 3, 3: 2}  # request id -> rows already in the KV cache
    inputs = model.inputs(batch.tokens)

    reference = model.plain_forward(inputs["hidden"], inputs["residual"],
                                    model.step(batch, model.cache(contexts)))

    graph = model.model_graph(args.attention)
    print(graph.layers[1])
    plan = build_plan(args.strategy, graph, split(batch, 2, split_requests=True))
    print(plan)

    step = model.step(plan.split, model.cache(contexts))  # per-microbatch metadata
    start = time.perf_counter()
    with Executor(plan, args.backend) as executor:
        out = executor.run(inputs, context=step)
    elapsed = time.perf_counter() - start

    print(f"\nran {plan.strategy} on {args.backend} in {elapsed * 1e3:.1f} ms")
    for name, tensor in out.items():
        same = torch.equal(tensor, reference[name])
        diff = (tensor - reference[name]).abs().max().item()
        print(f"  {name:13s} {'bitwise equal' if same else 'DIFFERS'} to the plain forward "
              f"(max |diff| {diff:.3g})")


if __name__ == "__main__":
    main()
