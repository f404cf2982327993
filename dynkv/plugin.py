"""vLLM plugin hook: makes ``"kv_connector": "DynKVConnector"`` resolve once dynkv is installed.

vLLM calls every ``vllm.general_plugins`` entry point in each of its
processes (API server, engine core, workers) before it builds a connector;
dynkv's points here. Registration is lazy: vLLM imports
:mod:`dynkv.connector` only when the connector is used.
"""

from __future__ import annotations

__all__ = ["CONNECTOR_NAME", "register"]

CONNECTOR_NAME = "DynKVConnector"


def register() -> None:
    """Register :class:`dynkv.connector.DynKVConnector` with vLLM's connector factory (idempotent)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "dynkv.connector", CONNECTOR_NAME)
