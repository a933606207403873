"""``python -m coordinator`` == ``blocktxn coordinator``."""

import sys

from blocktxn.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["coordinator", *sys.argv[1:]]))
