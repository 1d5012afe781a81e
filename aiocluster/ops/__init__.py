"""Around a running primary: signals, the control socket, the admin endpoint, systemd, the
status table. Runs in the primary (the control client and status table also in the CLI).

Internal: the public API is :mod:`aiocluster` and :mod:`aiocluster.web`.
"""
