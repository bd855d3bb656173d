"""``python -m sfwatch``."""

from sfwatch.cli import main

raise SystemExit(main())
