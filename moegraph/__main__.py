"""``python -m moegraph``: the same as the ``moegraph`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
