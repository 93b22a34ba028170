"""``python -m lightning_influence.cli`` = the ``lightning-influence`` command."""

from lightning_influence.cli import main

raise SystemExit(main())
