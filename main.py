"""Start the router: `uv run python main.py` (the same as `kvroute serve`)."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
