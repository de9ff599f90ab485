"""`python -m llmprune ...` is the same as the `llmprune` command."""
import sys

from .cli import main

sys.exit(main())
