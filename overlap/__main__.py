"""``python -m overlap`` is the ``overlap`` command."""

try:
    from overlap.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: the same one line as later
    import sys

    sys.stderr.write("overlap: interrupted\n")
    raise SystemExit(130) from None

raise SystemExit(main())
