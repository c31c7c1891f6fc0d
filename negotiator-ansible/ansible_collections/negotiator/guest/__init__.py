"""The Ansible collection negotiator.guest (its plugins are in plugins/); a package for pip's sake."""
