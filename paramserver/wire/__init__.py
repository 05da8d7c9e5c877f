"""How nodes talk: the message format, the sockets, and the paths large arrays take.

* ``protocol.py``  message kinds, the header schema, frame encoding and decoding
* ``transport.py`` the connecting side (Endpoint: a socket per peer, request ids, replies to
                   futures); re-exports the rest of the transport:
  ``router.py``    the bound side (Router) and its link events (ZMTP liveness)
  ``future.py``    futures and ``gather``
  ``security.py``  CURVE keys from the cluster token, the ZAP handler
  ``heartbeat.py`` beats on their own thread and socket (Pulse; no membership)
  ``sockets.py``   contexts, frames, the listening socket a launcher hands over (ZMQ_USE_FD)
* ``bulk.py``      a raw TCP connection beside ZeroMQ for large dense values
* ``shm.py``       shared-memory segments between processes on one host; ``slots.py`` the
                   slots of them that carry the arrays of sparse requests
* ``codec.py``     value codecs (float16, bfloat16, int8 with a per-row scale)
* ``paths.py``     a server's side of all those paths: a handler gets a ``Request`` (its arrays)
                   and a ``Reply`` that answers the way the request came; ``poller.py`` the
                   server's poll over its ROUTER and bulk sockets; ``refusal.py`` a handler's
                   "no" (``Refusal``), sent as an error reply

Nothing outside this package imports ``zmq``.
"""
