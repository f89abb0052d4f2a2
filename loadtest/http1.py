"""HTTP/1.1 for the load generator: the gateway's own sans-IO client codec, re-exported.

There is one HTTP/1.1 response decoder in the repo, `proxy.core.http1` (the upstream transport
uses it too); its docstring has the rules and the per-chunk figures (~0.65 µs per chunked SSE
event on this machine vs ~6 µs for h11: the load generator must never be the bottleneck).
"""

from proxy.core.http1 import MAX_HEAD, Head, ProtocolError, ResponseDecoder, encode_request

__all__ = ["MAX_HEAD", "Head", "ProtocolError", "ResponseDecoder", "encode_request"]
