"""``python -m agent`` == ``blocktxn agent``."""

from blocktxn.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["agent", *__import__("sys").argv[1:]]))
