"""dynkv's vLLM KV connector: everything that imports vLLM lives in this package (and ``dynkv.plugin``).

vLLM resolves ``"kv_connector": "DynKVConnector"`` to this module (through
``dynkv.plugin`` or ``kv_connector_module_path: "dynkv.connector"``).
"""

from dynkv.connector.connector import (
    DynKVConnector,
    DynKVMetadata,
    DynKVPromMetrics,
    DynKVStats,
    DynKVWorkerMetadata,
)

__all__ = ["DynKVConnector", "DynKVMetadata", "DynKVPromMetrics", "DynKVStats", "DynKVWorkerMetadata"]
