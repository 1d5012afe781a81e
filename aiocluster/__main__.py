"""``python -m aiocluster`` is the ``aiocluster`` command."""

from .cli import main

if __name__ == "__main__":
    main()
