"""Inference engines on top of kvtier.

    transformers.py   save / load a model's DynamicCache by token prefix; generate()
    vllm.py           KVTierConnector, vLLM's V1 KV connector (scheduler + worker)
    sglang.py         KVTierHiCacheStorage, an SGLang HiCache storage backend
    engine_api.py     the init_engine / store_kv / retrieve_kv API (seed 000)
    paged.py          gather / scatter between paged engine KV caches and blocks

Every integration talks to a :class:`~kvtier.integrations.backend.KVBackend`: an
embedded :class:`~kvtier.TieredStore` or a :class:`~kvtier.Client` of a node, picked
by ``engine.server``. None of these modules imports an engine at import time, so
kvtier works without any of them installed.
"""
