"""`python -m usjepa` is `usjepa` (so `torchrun -m usjepa train ...` works)."""

from usjepa.cli import main

raise SystemExit(main())
