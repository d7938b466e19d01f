"""``python -m overlap`` is the ``overlap`` command."""

from overlap.cli import main

raise SystemExit(main())
