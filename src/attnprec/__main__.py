"""``python -m attnprec``: the command line."""

from attnprec.cli import main

raise SystemExit(main())
