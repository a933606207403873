"""``python -m blocktxn.coordinator`` == ``blocktxn coordinator``."""

import sys

from .main import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
