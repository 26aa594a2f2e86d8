"""`python -m barlow.cli` equals the `barlow` command."""

from barlow.cli import main

main()
