"""vLLM plugin hook: makes ``"kv_connector": "DynKVConnector"`` resolve once dynkv is installed.

vLLM calls every ``vllm.general_plugins`` entry point in each of its
processes (API server, engine core, workers) before it builds a connector;
dynkv's points here. Registration is lazy: vLLM imports
:mod:`dynkv.connector` only when the connector is used.

It also checks dynkv's settings as early as vLLM allows. vLLM hands a
connector its config only once the model is loaded and the KV cache sized
(minutes into a large model's start); but it looks the connector class up
with the ``kv_transfer_config`` while it builds its own config, in the
process that parses the command line, before any engine starts. The lookup
is wrapped so that, for the DynKVConnector, a bad
``kv_connector_extra_config`` fails there, with the message that names the
key (:meth:`dynkv.connector.DynKVConnector.check_extra_config`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONNECTOR_NAME", "register"]

CONNECTOR_NAME = "DynKVConnector"


def register() -> None:
    """Register :class:`dynkv.connector.DynKVConnector` with vLLM's connector factory (idempotent)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "dynkv.connector", CONNECTOR_NAME)
    _check_on_lookup(KVConnectorFactory)


def _check_on_lookup(factory: Any) -> None:
    """Wrap ``factory.get_connector_class`` so that looking up the DynKVConnector checks its settings (wrapped once)."""
    lookup = getattr(factory, "get_connector_class", None)
    if lookup is None or getattr(lookup, "_dynkv_checks", False):
        return
    original = lookup.__func__

    def get_connector_class(cls: Any, kv_transfer_config: Any) -> Any:
        connector_cls = original(cls, kv_transfer_config)
        check = getattr(connector_cls, "check_extra_config", None)
        if getattr(kv_transfer_config, "kv_connector", None) == CONNECTOR_NAME and check is not None:
            check(getattr(kv_transfer_config, "kv_connector_extra_config", None))
        return connector_cls

    get_connector_class._dynkv_checks = True  # type: ignore[attr-defined]
    get_connector_class.__doc__ = original.__doc__
    factory.get_connector_class = classmethod(get_connector_class)
