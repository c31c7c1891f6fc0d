"""``python -m negotiator_guest``: the same as the ``negotiator-guest`` program."""

from negotiator_guest.cli import main

main()
