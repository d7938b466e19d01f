"""Cut the calibration excerpt of a PyTorch-profiler trace: what the kernel reader needs, no more.

``tests/data/deepseek-train-kernels.json.gz`` is this script's output for ``train.json`` of
github.com/deepseek-ai/profile-data at commit 4496024 (963 kernels: the whole trace's, 38 KB)::

    git clone https://github.com/deepseek-ai/profile-data && git -C profile-data checkout 4496024
    python tools/trace_excerpt.py profile-data/train.json tests/data/deepseek-train-kernels.json.gz \
        --source "excerpt of train.json from https://github.com/deepseek-ai/profile-data (commit 4496024)"

Kept: device kernels (``cat == "kernel"``; args ``correlation``, ``stream``, ``grid``), user
annotations (no args), the runtime/driver launch events of the kept kernels (args
``correlation``), the ``process_labels`` metadata, ``deviceProperties`` of the traced device and
``distributedInfo``. Dropped: CPU ops, flows, memsets/memcpys and every other arg. The output
is gzip with a zero timestamp, so the same input gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlap._atomic import atomic_path  # noqa: E402
from overlap.errors import ConfigError, OverlapError  # noqa: E402

KERNEL_ARGS = ("correlation", "stream", "grid")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
WHAT = ("device kernels, user annotations, the runtime launches of those kernels and the GPU "
        "process label; everything else dropped")


def excerpt(trace: dict[str, Any], source: str) -> dict[str, Any]:
    """The excerpt of a loaded trace (a ``{"traceEvents": [...]}`` object)."""
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise ConfigError("not a profiler trace: expected an object with a 'traceEvents' list")
    kernels = [e for e in events if isinstance(e, dict) and e.get("cat") == "kernel"]
    if not kernels:
        raise ConfigError("the trace has no device kernels (events with cat 'kernel')")
    launched = {e.get("args", {}).get("correlation") for e in kernels}
    devices = {e.get("pid") for e in kernels}
    kept = []
    for e in events:
        if not isinstance(e, dict):
            continue
        cat, args = e.get("cat"), e.get("args") if isinstance(e.get("args"), dict) else {}
        if cat == "kernel":
            kept.append({**_plain(e), "args": {k: args[k] for k in KERNEL_ARGS if k in args}})
        elif cat == "user_annotation":
            kept.append(_plain(e))
        elif cat in LAUNCH_CATS and args.get("correlation") in launched:
            kept.append({**_plain(e), "args": {"correlation": args["correlation"]}})
        elif e.get("ph") == "M" and e.get("name") == "process_labels":
            kept.append(e)
    props = [p for p in trace.get("deviceProperties", []) if p.get("id") in devices]
    return {"source": f"{source}: {WHAT}", "deviceProperties": props,
            "distributedInfo": trace.get("distributedInfo", {}), "traceEvents": kept}


def _plain(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "args"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="profiler trace JSON (plain or .gz)")
    parser.add_argument("out", help="excerpt to write (.json.gz)")
    parser.add_argument("--source", required=True, help="where the trace came from (kept in it)")
    args = parser.parse_args(argv)
    try:
        opener = gzip.open if Path(args.trace).read_bytes()[:2] == b"\x1f\x8b" else open
        with opener(args.trace, "rt", encoding="utf-8") as handle:
            trace = json.load(handle)
        text = json.dumps(excerpt(trace, args.source), separators=(",", ":"))
        with atomic_path(args.out) as tmp, open(tmp, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
            out.write(text.encode())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, OverlapError) as exc:
        print(f"trace_excerpt: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(text)} bytes of JSON")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
