"""A worker process: its link to the primary, serving each kind of application, adopting
handed connections, draining. Never imports the primary's or the ops modules.

Internal: the public API is :mod:`aiocluster` and :mod:`aiocluster.web`.
"""
