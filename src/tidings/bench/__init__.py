"""``tidings bench``: the same workload over every transport, measured; the seed's comparison
table with numbers in it.

The controller (``runner``) starts a hub per transport (``hub``) and a load generator process
(``loadgen``) that runs the ``workload`` through that transport's ``driver``: lean asyncio
protocols (``sse``, ``ws``, ``polling``, ``grpc``, ``webhooks``, ``mqtt``, ``amqp``) that count
what they read and write. ``stats`` and ``report`` are pure; ``chart`` draws the PNG. The method
is in docs/benchmarks.md.
"""
