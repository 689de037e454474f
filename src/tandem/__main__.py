"""`python -m tandem ...` is the same as the `tandem` command (torchrun uses this form)."""

from tandem.cli import main

raise SystemExit(main())
