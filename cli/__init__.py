"""The ``vmq`` command-line front end (installed as the ``vmq_cli`` package)."""
