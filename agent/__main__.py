"""``python -m agent`` == ``blocktxn agent``."""

import sys

from blocktxn.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["agent", *sys.argv[1:]]))
