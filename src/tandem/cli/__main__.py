"""`python -m tandem.cli` is the `tandem` command too."""

from tandem.cli import main

raise SystemExit(main())
