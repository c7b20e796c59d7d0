"""`python -m grid` is the `slamgrid` command."""

from grid.cli import main

raise SystemExit(main())
