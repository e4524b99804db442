"""One typed configuration: YAML file < ``KVTIER_*`` environment < command-line flags.

Every section is a frozen dataclass; every field has a ``doc`` (rendered into
``docs/configuration.md`` by ``kvtier config --markdown``) and is validated on
construction with a message that names the key and what is allowed. Sizes accept units
(``"4GiB"``, ``"512MB"``, ``"1.5g"``); durations are seconds.

Sources, later ones winning:

1. a YAML file (``--config kvtier.yaml`` or ``KVTIER_CONFIG``), sections as mappings::

       memory:
         capacity_bytes: 8GiB
       disk:
         capacity_bytes: 200GiB

2. environment variables ``KVTIER_<SECTION>_<KEY>``, e.g.
   ``KVTIER_MEMORY_CAPACITY_BYTES=8GiB``;
3. flags ``--set section.key=value`` (and the named flags each command offers).

This module is the only place that reads the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kvtier.errors import ConfigError

__all__ = [
    "ClusterConfig",
    "Config",
    "DiskConfig",
    "EngineConfig",
    "MemoryConfig",
    "RouterConfig",
    "RouterModelConfig",
    "RouterPodConfig",
    "ServerConfig",
    "RemoteConfig",
    "StoreConfig",
    "load_config",
    "parse_bytes",
    "render_markdown",
]

ENV_PREFIX = "KVTIER_"
GiB = 1 << 30
MiB = 1 << 20

PolicyName = Literal[
    "lru", "weighted_lru", "leaf_lru", "s3fifo", "arc", "lfu", "hit_density"
]
WritePolicy = Literal["write_through", "write_behind", "write_back"]
CodecName = Literal["none", "lz4", "zstd"]


def _doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    if isinstance(default, dict | list):
        return field(
            default_factory=lambda: type(default)(default), metadata={"doc": text}
        )
    return field(default=default, metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class QuotaConfig:
    """Byte limits of one quota group (tenant or instance group), per tier."""

    memory_bytes: int | None = _doc("Most bytes the group may hold in memory.", None)
    disk_bytes: int | None = _doc("Most bytes the group may hold on disk.", None)


@dataclass(frozen=True)
class StoreConfig:
    """How the tiers work together."""

    data_dir: str = _doc(
        "Directory of everything kvtier persists (the disk tier defaults to "
        "<data_dir>/disk).",
        "./kvtier-data",
    )
    block_tokens: int = _doc(
        "Tokens per block (a multiple of the engine's block size).", 256
    )
    write_policy: WritePolicy = _doc(
        "When blocks put in memory reach disk: write_through (before put returns), "
        "write_behind (soon after, by a background writer) or write_back (only when "
        "evicted from memory).",
        "write_behind",
    )
    high_watermark: float = _doc(
        "Fraction of a tier's capacity at which eviction starts.", 0.9
    )
    low_watermark: float = _doc("Fraction of capacity eviction frees down to.", 0.8)
    kv_expire_time: float = _doc(
        "Seconds a block lives after it is put (0 = forever).", 0.0
    )
    cleanup_interval: float = _doc(
        "Seconds between background sweeps of expired blocks.", 60.0
    )
    lease_seconds: float = _doc(
        "How long a read holds a block against eviction (a crashed reader's lease "
        "runs out on its own).",
        5.0,
    )
    reservation_timeout: float = _doc(
        "Seconds a two-phase write may hold reserved slots before they are taken "
        "back (a writer that died leaks nothing).",
        30.0,
    )
    write_queue_bytes: int = _doc(
        "Most bytes of blocks waiting for the write-behind writer before puts "
        "write to disk themselves.",
        256 * MiB,
    )
    reserve_ahead_fraction: float = _doc(
        "Share of the memory tier that same-host clients may hold reserved, all "
        "together, for their next puts (each put's commit reserves slots for the "
        "next, which then makes one round trip instead of two; 0 turns it off).",
        0.0625,
    )
    quotas: dict[str, QuotaConfig] = _doc(
        "Per quota group (the namespace's tenant) byte limits: "
        "{group: {memory_bytes, disk_bytes}}.",
        {},
    )

    def __post_init__(self) -> None:
        _check_positive("store.block_tokens", self.block_tokens)
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ConfigError(
                "store.low_watermark and store.high_watermark must satisfy "
                f"0 < low <= high <= 1, got low={self.low_watermark} "
                f"high={self.high_watermark}"
            )
        _check_non_negative("store.kv_expire_time", self.kv_expire_time)
        _check_positive("store.cleanup_interval", self.cleanup_interval)
        _check_positive("store.lease_seconds", self.lease_seconds)
        _check_positive("store.reservation_timeout", self.reservation_timeout)
        _check_non_negative("store.write_queue_bytes", self.write_queue_bytes)
        if not 0.0 <= self.reserve_ahead_fraction <= 1.0:
            raise ConfigError(
                "store.reserve_ahead_fraction must be within [0, 1], got "
                f"{self.reserve_ahead_fraction!r}"
            )


@dataclass(frozen=True)
class MemoryConfig:
    """The memory tier: one preallocated arena."""

    capacity_bytes: int = _doc("Size of the memory arena.", 4 * GiB)
    policy: PolicyName = _doc(
        "Eviction policy of the memory tier (docs/replay.md compares them).",
        "hit_density",
    )
    slab_bytes: int = _doc("Target slab size of the arena allocator.", 4 * MiB)
    huge_pages: bool = _doc("Ask for transparent huge pages for the arena.", True)
    shared: bool = _doc(
        "Back the arena with shared memory (a memfd) that same-host clients of "
        "`kvtier serve` map; `kvtier serve` turns it on.",
        False,
    )

    def __post_init__(self) -> None:
        _check_positive("memory.capacity_bytes", self.capacity_bytes)
        _check_positive("memory.slab_bytes", self.slab_bytes)


@dataclass(frozen=True)
class DiskConfig:
    """The local-SSD tier: a segment log with a SQLite index."""

    enabled: bool = _doc("Keep a disk tier below memory.", True)
    path: str = _doc("Directory of the disk tier ('' = <store.data_dir>/disk).", "")
    capacity_bytes: int = _doc("Most bytes the disk tier may use.", 32 * GiB)
    policy: PolicyName = _doc("Eviction policy of the disk tier.", "hit_density")
    segment_bytes: int = _doc("Size of one append-only segment file.", 256 * MiB)
    fsync: bool = _doc(
        "fsync segments before committing the index (survives power loss; slower).",
        False,
    )
    compression: CodecName = _doc("Compress blocks on disk: none, lz4 or zstd.", "none")

    def __post_init__(self) -> None:
        _check_positive("disk.capacity_bytes", self.capacity_bytes)
        _check_positive("disk.segment_bytes", self.segment_bytes)


@dataclass(frozen=True)
class RemoteConfig:
    """Shared tiers below disk, by URL, asked in order (docs/architecture.md)."""

    urls: list[str] = _doc(
        "Tier URLs: file:///dir, redis://, rediss://, redis+sentinel://, "
        "redis+cluster://, s3://bucket/prefix?endpoint_url=..., kvtier://host:port. "
        "Comma-separated in the environment and flags.",
        [],
    )
    compression: CodecName = _doc("Compress blocks: none, lz4 or zstd.", "none")
    retry_after: float = _doc(
        "Seconds an unreachable tier is skipped before it is tried again (doubling "
        "while it stays down, up to 30).",
        1.0,
    )

    def __post_init__(self) -> None:
        _check_positive("remote.retry_after", self.retry_after)
        for url in self.urls:
            if "://" not in url:
                raise ConfigError(f"remote.urls entries are URLs, got {url!r}")


_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass(frozen=True)
class RouterPodConfig:
    """One inference engine the router follows (a vLLM pod; one data-parallel rank)."""

    model: str = _doc("The model the pod serves (the namespace of its block keys).", "")
    endpoint: str = _doc(
        "The pod's KV event publisher (vLLM's kv-events endpoint), which the router "
        "connects to, e.g. tcp://10.0.0.7:5557; '' when the pod publishes to "
        "router.bind_endpoint instead.",
        "",
    )
    replay_endpoint: str = _doc(
        "The pod's replay socket (vLLM's replay_endpoint), asked for missed batches "
        "after a gap; '' = the pod offers none.",
        "",
    )
    topic: str = _doc("Topic prefix to subscribe to ('' = every topic).", "")


@dataclass(frozen=True)
class RouterModelConfig:
    """How one model's block keys are namespaced, as its engines' kvtier store does."""

    layout_id: str = _doc(
        "KV layout fingerprint of the model (KVLayout.layout_id).", ""
    )
    tenant: str = _doc("Tenant of the store's namespace.", "default")
    tp_size: int = _doc("Tensor-parallel size of the engines (keys of rank 0).", 1)
    tokenizer: str = _doc(
        "Local tokenizer (a directory or tokenizer.json) for text prompts.", ""
    )


@dataclass(frozen=True)
class RouterConfig:
    """``kvtier route``: engine KV events -> global index -> the pod for a prompt."""

    listen: str = _doc("HOST:PORT of the router's HTTP API.", "127.0.0.1:8790")
    auth_token: str = _doc(
        "Bearer token the router's HTTP API requires on every path but /healthz and "
        "/openapi.json (pods can be added there: set one when others can reach it); "
        "'' = none.",
        "",
    )
    bind_endpoint: str = _doc(
        "ZMQ endpoint the router binds for pods that publish to it (topic "
        "kv@<pod>@<model> names the pod, which is added when first heard); '' = none.",
        "",
    )
    pods: dict[str, RouterPodConfig] = _doc(
        "Pods followed from the start: {pod_id: {model, endpoint, replay_endpoint, "
        "topic}}; more come and go through the API.",
        {},
    )
    models: dict[str, RouterModelConfig] = _doc(
        "Per model: {layout_id, tenant, tp_size, tokenizer}, so the router's keys "
        "equal the store's.",
        {},
    )
    block_tokens: int = _doc(
        "Tokens per indexed block (the store's block_tokens; a multiple of the "
        "engines' block size). Partial blocks are not indexed.",
        256,
    )
    hash_seed: int = _doc("Seed of the key namespace (the store's).", 0)
    tier_weights: dict[str, float] = _doc(
        "Credit of a block a pod holds, by vLLM medium; blocks on media not listed "
        "are not indexed.",
        {"GPU": 1.0, "CPU": 0.8},
    )
    store_url: str = _doc(
        "The shared kvtier store every pod can load from: http://HOST:PORT of a "
        "kvtier node, 'embedded' (a store opened from this configuration) or '' "
        "(none).",
        "",
    )
    store_token: str = _doc(
        "Bearer token of the node's HTTP API (its server.auth_token); '' = none.", ""
    )
    store_weight: float = _doc("Credit of a block only the shared store holds.", 0.5)
    store_timeout_seconds: float = _doc(
        "Longest a route waits for the shared store (then counts none there).", 0.05
    )
    load_weight: float = _doc(
        "How much a pod's reported load (0..1) lowers its score: score = cached "
        "fraction - load_weight * load.",
        0.5,
    )
    max_blocks_per_pod: int = _doc(
        "Most engine blocks indexed per pod; past it the least recently stored go.",
        262_144,
    )
    silence_seconds: float = _doc(
        "A pod silent this long expires: its blocks are no longer credited (0 = "
        "never).",
        600.0,
    )
    replay_timeout_seconds: float = _doc(
        "Longest wait for a pod's replay of missed batches.", 5.0
    )

    def __post_init__(self) -> None:
        _check_listen("router.listen", self.listen)
        if self.bind_endpoint:
            _check_zmq("router.bind_endpoint", self.bind_endpoint)
        for pod_id, pod in self.pods.items():
            check_router_pod(f"router.pods.{pod_id}", pod)
        for name, model in self.models.items():
            _check_positive(f"router.models.{name}.tp_size", model.tp_size)
        _check_positive("router.block_tokens", self.block_tokens)
        if not 0 <= self.hash_seed < 2**64:
            raise ConfigError(
                f"router.hash_seed must be in [0, 2**64), got {self.hash_seed}"
            )
        self._check_weights()
        if self.store_url not in ("", "embedded") and not self.store_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                "router.store_url must be '', 'embedded' or http(s)://HOST:PORT, "
                f"got {self.store_url!r}"
            )
        _check_positive("router.store_timeout_seconds", self.store_timeout_seconds)
        _check_positive("router.max_blocks_per_pod", self.max_blocks_per_pod)
        _check_non_negative("router.silence_seconds", self.silence_seconds)
        _check_positive("router.replay_timeout_seconds", self.replay_timeout_seconds)

    def _check_weights(self) -> None:
        if not 1 <= len(self.tier_weights) <= 8:
            raise ConfigError(
                f"router.tier_weights must name 1 to 8 media, got {self.tier_weights!r}"
            )
        for medium, weight in self.tier_weights.items():
            _check_positive(f"router.tier_weights.{medium}", weight)
        _check_non_negative("router.store_weight", self.store_weight)
        _check_non_negative("router.load_weight", self.load_weight)


def check_router_pod(key: str, pod: RouterPodConfig) -> None:
    """Validates one pod's settings; ``key`` names it in the message.

    Raises:
        ConfigError: No model, or an endpoint that is not a ZMQ address.
    """
    if not pod.model:
        raise ConfigError(f"{key}.model must name the model the pod serves")
    for name in ("endpoint", "replay_endpoint"):
        value = getattr(pod, name)
        if value:
            _check_zmq(f"{key}.{name}", value)
    if pod.replay_endpoint and not pod.endpoint:
        raise ConfigError(f"{key}.replay_endpoint needs {key}.endpoint")


@dataclass(frozen=True)
class ServerConfig:
    """`kvtier serve`: the node's listeners, authentication and limits."""

    host: str = _doc("Address the TCP protocol, HTTP and gRPC listen on.", "127.0.0.1")
    port: int = _doc("TCP port of kvtier's binary protocol.", 7480)
    http_port: int = _doc(
        "Port of the HTTP admin API (/metrics, /v1/...); 0 = off.", 7481
    )
    grpc_port: int = _doc("Port of the gRPC service; 0 = off.", 7482)
    node_id: str = _doc(
        "Name of this node in logs, metrics and the cluster ('' = hostname:port).", ""
    )
    auth_token: str = _doc(
        "Shared secret every client must present ('' = no authentication). Prefer "
        "the KVTIER_SERVER_AUTH_TOKEN environment variable to a file.",
        "",
    )
    tenant_tokens: dict[str, str] = _doc(
        "Per-tenant tokens {tenant: token}: a client holding one sees only its "
        "tenant's blocks (the node scopes its keys, forces its quota group, and "
        "refuses it listings, status and the shared-memory path). Needs "
        "auth_token, which stays the operators' token that sees everything.",
        {},
    )
    tls_cert: str = _doc("PEM certificate: serve TCP and gRPC over TLS.", "")
    tls_key: str = _doc("PEM private key of tls_cert.", "")
    shared_memory: bool = _doc(
        "Offer same-host clients the memory arena over a Unix socket.", True
    )
    max_payload_bytes: int = _doc(
        "Largest payload one frame may carry; a larger one closes the connection.",
        4 * GiB,
    )
    max_connections: int = _doc("Most client connections served at once.", 1024)
    hello_timeout: float = _doc(
        "Seconds a new connection has to authenticate (HELLO) before it is closed, "
        "so idle strangers cannot hold every connection slot.",
        10.0,
    )
    max_keys_per_request: int = _doc(
        "Most keys one request may name (protocol, HTTP and gRPC alike).", 65536
    )
    max_open_per_connection: int = _doc(
        "Most reservations and leases one connection may hold open at once.", 1024
    )
    drain_seconds: float = _doc(
        "On SIGTERM, how long in-flight requests get to finish.", 10.0
    )
    transfer_timeout: float = _doc(
        "Seconds the blocks of one TCP request may take to cross the connection (a "
        "put's payload, a get's reply). They go straight between the socket and "
        "the memory arena, whose slots stay held until they are through; a client "
        "slower than this is disconnected, so it cannot pin memory for longer.",
        60.0,
    )

    def __post_init__(self) -> None:
        for key in ("port", "http_port", "grpc_port"):
            value = getattr(self, key)
            if not 0 <= value <= 65535:
                raise ConfigError(f"server.{key} must be in [0, 65535], got {value}")
        if self.port == 0:
            raise ConfigError("server.port must be a port number, got 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        _check_positive("server.max_payload_bytes", self.max_payload_bytes)
        _check_positive("server.max_connections", self.max_connections)
        _check_non_negative("server.drain_seconds", self.drain_seconds)
        _check_positive("server.hello_timeout", self.hello_timeout)
        _check_positive("server.transfer_timeout", self.transfer_timeout)
        _check_positive("server.max_keys_per_request", self.max_keys_per_request)
        _check_positive("server.max_open_per_connection", self.max_open_per_connection)
        self._check_tenant_tokens()

    def _check_tenant_tokens(self) -> None:
        if not self.tenant_tokens:
            return
        if not self.auth_token:
            raise ConfigError(
                "server.tenant_tokens needs server.auth_token (the operators' token); "
                "without it anyone would be an operator"
            )
        tokens = list(self.tenant_tokens.values())
        for tenant, token in self.tenant_tokens.items():
            if not tenant or not token:
                raise ConfigError(
                    "server.tenant_tokens maps non-empty tenant names to non-empty "
                    f"tokens, got {tenant!r}: {'***' if token else repr(token)}"
                )
        if len(set(tokens)) != len(tokens) or self.auth_token in tokens:
            raise ConfigError(
                "server.tenant_tokens: every tenant needs its own token, different "
                "from server.auth_token"
            )


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster mode: nodes coordinated through etcd (`kvtier serve --cluster`)."""

    name: str = _doc("Name of the cluster to join ('' = a standalone node).", "")
    etcd: str = _doc(
        "etcd endpoints, comma-separated host:port (any members; failover is "
        "automatic).",
        "127.0.0.1:2379",
    )
    zone: str = _doc(
        "Failure domain of this node (rack, host group): replicas of a block go to "
        "different zones when there are enough.",
        "",
    )
    advertise: str = _doc(
        "host:port clients reach this node at ('' = server.host:server.port, or "
        "the host name when the node listens on a wildcard address).",
        "",
    )
    lease_ttl: int = _doc(
        "Seconds a node stays registered without a keepalive (how long the cluster "
        "takes to notice a dead node).",
        5,
    )
    replicas: int = _doc(
        "Copies of each block (R); written into etcd by the first node of the cluster.",
        2,
    )
    write_quorum: int = _doc(
        "Replicas that must store a block for a put to succeed (W <= R).", 1
    )

    def __post_init__(self) -> None:
        if "/" in self.name:
            raise ConfigError(f"cluster.name must not contain '/', got {self.name!r}")
        _check_positive("cluster.lease_ttl", self.lease_ttl)
        _check_positive("cluster.replicas", self.replicas)
        if not 1 <= self.write_quorum <= self.replicas:
            raise ConfigError(
                "cluster.write_quorum must be in [1, cluster.replicas="
                f"{self.replicas}], got {self.write_quorum}"
            )

    @property
    def endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]


@dataclass(frozen=True)
class EngineConfig:
    """The inference-engine integrations (vLLM, SGLang, transformers, engine API)."""

    server: str = _doc(
        "host:port of the kvtier node the engine uses ('' = an embedded store in "
        "the engine's own process, configured by the other sections).",
        "",
    )
    token: str = _doc("The node's auth token, when it has one.", "")
    tenant: str = _doc(
        "Tenant (and quota group) the engine's blocks are keyed and counted under.",
        "default",
    )
    model_id: str = _doc(
        "Model name in block keys ('' = the name the engine knows the model by). "
        "Engines that must share blocks need the same name and weights.",
        "",
    )

    def __post_init__(self) -> None:
        if self.server and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.server):
            raise ConfigError(
                f"engine.server must be host:port or '', got {self.server!r}"
            )
        if not self.tenant:
            raise ConfigError("engine.tenant must not be empty")


@dataclass(frozen=True)
class Config:
    """The whole configuration of kvtier."""

    store: StoreConfig = field(default_factory=StoreConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def disk_path(self) -> Path:
        """Where the disk tier lives."""
        return Path(self.disk.path or Path(self.store.data_dir) / "disk")

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with ``{"section.key": value}`` overrides applied and validated."""
        return _build(_merge(_as_tree(self), _dotted_tree(overrides, "override")))

    def as_dict(self) -> dict[str, Any]:
        return _as_tree(self)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Builds the configuration from a YAML file, the environment and overrides.

    Args:
        path: YAML file; ``None`` reads ``KVTIER_CONFIG`` if set, else no file.
        env: Environment to read ``KVTIER_*`` from (default ``os.environ``).
        overrides: ``{"section.key": value}`` from flags; they win over everything.

    Raises:
        ConfigError: A file that cannot be read or parsed, an unknown key, or a value
            that is not allowed (the message names the key and the allowed values).
    """
    env = os.environ if env is None else env
    path = path if path is not None else env.get(ENV_PREFIX + "CONFIG") or None
    tree: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    tree = _merge(tree, _env_tree(env))
    tree = _merge(tree, _dotted_tree(overrides or {}, "override"))
    return _build(tree)


def parse_bytes(value: Any, key: str = "value") -> int:
    """``"4GiB"``, ``"512MB"``, ``"1.5g"``, ``1024`` -> bytes (k/m/g/t are binary).

    Raises:
        ConfigError: Not a size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a size like 4GiB or 1048576, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _SIZE_RE.fullmatch(str(value).strip().lower())
    if match is None:
        raise ConfigError(f"{key} must be a size like 4GiB or 1048576, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit or ""])


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)")
_UNITS = {
    "": 1,
    "b": 1,
    **{u: 1 << (10 * (i + 1)) for i, p in enumerate("kmgtp") for u in (p, p + "ib")},
    **{p + "b": 1000 ** (i + 1) for i, p in enumerate("kmgtp")},
}

_SECTIONS: dict[str, type[Any]] = {
    "store": StoreConfig,
    "memory": MemoryConfig,
    "disk": DiskConfig,
    "remote": RemoteConfig,
    "router": RouterConfig,
    "server": ServerConfig,
    "cluster": ClusterConfig,
    "engine": EngineConfig,
}


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _check_non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")


def _check_zmq(key: str, value: str) -> None:
    if not value.startswith(_ZMQ_SCHEMES):
        raise ConfigError(
            f"{key} must be a ZMQ endpoint ({', '.join(_ZMQ_SCHEMES)}...), "
            f"got {value!r}"
        )


def _check_listen(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key} must be HOST:PORT, e.g. 0.0.0.0:8790, got {value!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got "
            f"{type(data).__name__}"
        )
    return data


def _env_tree(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    sections = sorted(_SECTIONS, key=len, reverse=True)  # longest name first
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            allowed = ", ".join(ENV_PREFIX + s.upper() + "_..." for s in _SECTIONS)
            raise ConfigError(
                f"environment variable {name} names no section ({allowed})"
            )
        tree.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return tree


def _dotted_tree(overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(
                f"{source} {dotted!r} must look like section.key, e.g. "
                "memory.capacity_bytes"
            )
        tree.setdefault(section, {})[key] = value
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _build(tree: Mapping[str, Any]) -> Config:
    _reject_unknown(tree, _SECTIONS, "section")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = tree.get(name) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"section {name} must be a mapping, got {values!r}")
        sections[name] = _build_dataclass(cls, values, name)
    return Config(**sections)


def _build_dataclass(cls: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, fields, f"key in {prefix}")
    hints = get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}.{name}")
        for name, value in values.items()
    }
    return cls(**kwargs)


def _reject_unknown(values: Mapping[str, Any], allowed: Any, what: str) -> None:
    for name in values:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {what} {name!r}{hint}; allowed: {', '.join(allowed)}"
            )


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Converts a YAML, environment or flag value to the field's type."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return _coerce(options[0], value, key)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is dict:
        return _coerce_dict(get_args(hint)[1], value, key)
    if origin is list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [
            _coerce(get_args(hint)[0], item, f"{key}[{i}]")
            for i, item in enumerate(value)
        ]
    if hint is bool:
        return _coerce_bool(value, key)
    if hint is int:
        if key.endswith("_bytes"):
            return parse_bytes(value, key)
        return _coerce_number(int, value, key)
    if hint is float:
        return _coerce_number(float, value, key)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"config field {key} has an unsupported type {hint!r}")


def _coerce_dict(value_type: Any, value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key} must be a YAML mapping, got {value!r}") from exc
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if isinstance(value_type, type) and dataclasses.is_dataclass(value_type):
        built = {}
        for name, item in value.items():
            fields = item or {}
            if not isinstance(fields, Mapping):
                raise ConfigError(f"{key}.{name} must be a mapping, got {item!r}")
            built[str(name)] = _build_dataclass(value_type, fields, f"{key}.{name}")
        return built
    return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _coerce_number(kind: type[Any], value: Any, key: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} must be a number, got {value!r}") from exc
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return number


def _as_tree(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def render_markdown() -> str:
    """Every section and key with its type, default and meaning, as Markdown."""
    lines = [
        "# Configuration",
        "",
        "Generated by `kvtier config --markdown`; do not edit by hand.",
        "Set a key in the YAML file (`section: {key: value}`), as the environment",
        "variable `KVTIER_<SECTION>_<KEY>`, or with `--set section.key=value`.",
        "Sizes take units (`4GiB`, `512MB`); times are seconds.",
        "",
    ]
    for name, cls in _SECTIONS.items():
        lines += [f"## `{name}`", "", (cls.__doc__ or "").strip(), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else f.default
            )
            shown = _size_text(default) if f.name.endswith("_bytes") else repr(default)
            lines.append(
                f"| `{f.name}` | {_type_name(hints[f.name])} | `{shown}` | "
                f"{f.metadata.get('doc', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _size_text(nbytes: Any) -> str:
    if not isinstance(nbytes, int):
        return repr(nbytes)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " \\| ".join(repr(a) for a in get_args(hint))
    name = re.sub(
        r"kvtier\.config\.|typing\.", "", str(getattr(hint, "__name__", hint))
    )
    return name.replace("|", "\\|")
