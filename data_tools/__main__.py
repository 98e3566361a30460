"""``python -m data_tools``: see :mod:`data_tools.cli`."""

from data_tools.cli import main

if __name__ == "__main__":
    main(prog_name="python -m data_tools")
