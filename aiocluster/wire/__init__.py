"""The channel between processes: frames, descriptors, message names, addresses,
listening sockets. Used by every process; imports nothing of the other subpackages.

Internal: the public API is :mod:`aiocluster` and :mod:`aiocluster.web`.
"""
