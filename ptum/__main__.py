"""`python -m ptum` = the `ptum` command."""

from ptum.cli import main

raise SystemExit(main())
