"""Disaggregated prefill/decode: a prefill engine's pages pulled by a decode engine over NIXL.

- :mod:`dynkv.disagg.params`: the ``kv_transfer_params`` a prefill engine
  returns and a decode engine reads (checked field by field).
- :mod:`dynkv.disagg.trust`: what a decode engine accepts of those params
  (their MAC under the deployment's secret, the request's own keys).
- :mod:`dynkv.disagg.wire`: the ZMQ side channel and the handshake.
- :mod:`dynkv.disagg.exporter`: the prefill side, in the leader.
- :mod:`dynkv.disagg.puller`: the decode side, in each worker.
- :mod:`dynkv.disagg.nixl`: the only importer of NIXL.

Nothing here imports vLLM; NIXL and ZMQ are imported only by the modules
that need them, so aggregated serving runs without either.
"""

from dynkv.disagg.params import ParamsError, RemotePrefill, asks_remote_decode

__all__ = ["ParamsError", "RemotePrefill", "asks_remote_decode"]
