"""`python -m wgvsock`: the `wgvsock` command, where its script is not on PATH (a venv not
activated, sudo's secure_path)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
