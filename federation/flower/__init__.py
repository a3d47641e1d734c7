"""legend on Flower (Message API), one module per job.

- :mod:`~legend.federation.flower.codec`: the protocol; adapters, instructions, replies, the
  job and the server settings as Flower records.
- :mod:`~legend.federation.flower.client_app`: the ClientApp and the node's job cache.
- :mod:`~legend.federation.flower.server_app`: the Strategy and the ServerApp.
- :mod:`~legend.federation.flower.records`: the files a Flower run adds to its run directory.
- :mod:`~legend.federation.flower.node_worker`: the long-lived node worker (deployment);
  ``python -m legend.federation.flower node`` starts one.
- :mod:`~legend.federation.flower.flwr_internals`: the one module that reaches Flower's
  internals (the node worker's task runtime and the SuperLink's Control API).
- :mod:`~legend.federation.flower.errors`: the errors of a Flower run.

Every module except ``flwr_internals`` uses Flower's public packages only (``flwr.app``,
``flwr.clientapp``, ``flwr.serverapp``, ``flwr.simulation``). See ``docs/flower.md``.
"""
