"""The primary process: the cluster, its listens and handles, the rr balancer, starting
workers, supervision. Never imported by worker or zygote code.

Internal: the public API is :mod:`aiocluster` and :mod:`aiocluster.web`.
"""
