"""Top-level entry of the barlow CLI: `python cli.py ...` equals the installed `barlow ...`.

The Typer app lives in the package `barlow/cli/`; this file only hands over, so no top-level module named `cli`
is ever installed into site-packages.
"""

from barlow.cli import main

if __name__ == "__main__":
    main()
