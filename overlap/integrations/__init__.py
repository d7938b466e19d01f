"""Integrations of the planner and executor with serving engines.

Each sub-package adapts one engine (``vllm``) and imports that engine only when its entry point
runs, so ``import overlap`` stays free of it.
"""
