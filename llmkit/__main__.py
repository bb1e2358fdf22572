"""`python -m llmkit` runs the `llmkit` command."""

import sys

from llmkit.cli import main

if __name__ == "__main__":  # guard: pack's spawned workers re-import __main__
    sys.exit(main())
