"""``python -m negotiator_host``: the same as the ``negotiator-host`` program."""

from negotiator_host.oneshot import main

main()
