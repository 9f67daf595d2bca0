"""`python -m peftlab` is the same as the `peftlab` console script."""

from peftlab.cli import main

raise SystemExit(main())
