"""Static checks of the deployment files: docker-compose.yml, otel-collector.yaml, Dockerfile,
.dockerignore and the compose canary's spec (examples/compose.yaml).

No Docker engine is needed (nor used): the files are parsed and cross-checked against each other
and against what the pinned upstream releases accept. Fast, no network.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COLLECTOR_FILE = ROOT / "otel-collector.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SPEC_FILE = ROOT / "examples" / "compose.yaml"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"

# ---------------------------------------------------------------------------------------------
# What the pinned OpenTelemetry Collector Contrib release contains.
#
# The release is the one deploy/otelcol builds (deploy/build-binaries.sh); the real binary
# validates otel-collector.yaml in tests/test_e2e_jaeger.py, these static checks stay as the fast
# first line. Source: the v0.161.0 contrib distribution manifest,
#   https://github.com/open-telemetry/opentelemetry-collector-releases/blob/v0.161.0/distributions/otelcol-contrib/manifest.yaml
# and, for each module, the `type:` / `deprecated_type:` of its metadata.yaml at v0.161.0 (core:
# github.com/open-telemetry/opentelemetry-collector, contrib: ...-collector-contrib); the types of the
# components deploy/otelcol builds were read in those modules' generated_status.go at v0.161.0.
# This is the subset this stack uses or may plausibly use; every entry's module is listed in that
# manifest. Before using another component, add it here after checking both files at the pinned
# version (component types are being renamed to snake_case: `otlp` exporter -> `otlp_grpc` in
# v0.144.0, `spanmetrics` -> `span_metrics`), and bump CONTRIB_VERSION with the image tag.
# ---------------------------------------------------------------------------------------------
CONTRIB_VERSION = "0.161.0"
CONTRIB_MANIFEST_URL = (
    "https://github.com/open-telemetry/opentelemetry-collector-releases/blob/"
    f"v{CONTRIB_VERSION}/distributions/otelcol-contrib/manifest.yaml"
)
_CORE = "go.opentelemetry.io/collector"
_CONTRIB = "github.com/open-telemetry/opentelemetry-collector-contrib"
CONTRIB_COMPONENTS: dict[str, dict[str, str]] = {
    "receivers": {
        "otlp": f"{_CORE}/receiver/otlpreceiver",
        "nop": f"{_CORE}/receiver/nopreceiver",
    },
    "processors": {
        "batch": f"{_CORE}/processor/batchprocessor",
        "memory_limiter": f"{_CORE}/processor/memorylimiterprocessor",
        "tail_sampling": f"{_CONTRIB}/processor/tailsamplingprocessor",
    },
    "exporters": {
        "otlp_grpc": f"{_CORE}/exporter/otlpexporter",
        "otlp_http": f"{_CORE}/exporter/otlphttpexporter",
        "debug": f"{_CORE}/exporter/debugexporter",
        "nop": f"{_CORE}/exporter/nopexporter",
        "prometheus": f"{_CONTRIB}/exporter/prometheusexporter",
    },
    "connectors": {
        "forward": f"{_CORE}/connector/forwardconnector",
        "span_metrics": f"{_CONTRIB}/connector/spanmetricsconnector",
    },
    "extensions": {
        "zpages": f"{_CORE}/extension/zpagesextension",
    },
}
# Still accepted at the pinned version, but deprecated (a warning at every start, removal later).
DEPRECATED_TYPES: dict[str, dict[str, str]] = {
    "exporters": {"otlp": "otlp_grpc", "otlphttp": "otlp_http"},
    "connectors": {"spanmetrics": "span_metrics"},
}
# Which signal a connector consumes (as an exporter) and which it emits (as a receiver).
CONNECTOR_SIGNALS = {"span_metrics": ("traces", "metrics")}

# The otel/opentelemetry-collector-contrib image: FROM scratch, no shell (so no container
# healthcheck), and CMD ["--config", "/etc/otelcol-contrib/config.yaml"].
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib"
COLLECTOR_IMAGE_CONFIG_PATH = "/etc/otelcol-contrib/config.yaml"
# Jaeger v2 all-in-one (cmd/jaeger/internal/all-in-one.yaml at v2.x; JAEGER_LISTEN_HOST=0.0.0.0 in
# the image): OTLP gRPC/HTTP, UI, healthcheckv2.
JAEGER_PORTS = {4317, 4318, 16686, 13133}
REDIS_PORTS = {6379}
CANARY_HTTP_PORT = 9464

SLO_TARGETS_S = (5.0, 10.0, 60.0, 300.0)


# -- helpers ----------------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_COLLECTOR_VAR = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, pattern: re.Pattern[str]) -> Any:
    """Substitute ${VAR:-default} with its default (never the caller's environment: deterministic)."""
    if isinstance(node, str):
        return pattern.sub(lambda m: m.group(2) or "", node)
    if isinstance(node, dict):
        return {k: _interpolate(v, pattern) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, pattern) for v in node]
    return node


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(_load_yaml(COMPOSE_FILE), _COMPOSE_VAR)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return _interpolate(_load_yaml(COLLECTOR_FILE), _COLLECTOR_VAR)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf:
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    """Arguments of CMD/ENTRYPOINT/HEALTHCHECK CMD: JSON exec form, else shell words."""
    try:
        value = json.loads(args)
    except ValueError:
        return shlex.split(args)
    assert isinstance(value, list), f"not an exec-form list: {args}"
    return [str(v) for v in value]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _image_ref(ref: str) -> tuple[str, str | None]:
    """('repo/name', tag or None); a digest-only reference has no tag."""
    ref = ref.split("@", 1)[0]
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no colon, or the colon belonged to a registry host:port
        return ref, None
    return name, tag


def _pinned(tag: str | None) -> bool:
    return bool(tag) and tag != "latest" and bool(re.search(r"\d", tag or ""))


def _component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def _go_duration_s(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a Go duration: {text!r}"
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _host_port(endpoint: str) -> tuple[str, int]:
    if "://" not in endpoint:
        endpoint = "tcp://" + endpoint
    parts = urlsplit(endpoint)
    default = {"http": 80, "https": 443, "redis": 6379}.get(parts.scheme)
    port = parts.port or default
    assert parts.hostname and port, f"no host:port in {endpoint!r}"
    return parts.hostname, port


def _urls_in(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, str):
        found += re.findall(r"\b(?:https?|redis)://[^\s\"'{}]+", node)
    elif isinstance(node, dict):
        for v in node.values():
            found += _urls_in(v)
    elif isinstance(node, list):
        for v in node:
            found += _urls_in(v)
    return found


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a path is excluded if it or a parent matches a pattern (last match wins)."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            hit = any(
                fnmatch.fnmatch(c.split("/")[-1], pat[3:]) or fnmatch.fnmatch(c, pat[3:]) for c in candidates
            )
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _service_ports(services: dict[str, dict[str, Any]], collector: dict[str, Any]) -> dict[str, set[int]]:
    """Ports each compose service listens on inside the compose network."""
    ports: dict[str, set[int]] = {
        "redis": set(REDIS_PORTS),
        "jaeger": set(JAEGER_PORTS),
        "canary": {CANARY_HTTP_PORT},
    }
    sandbox = _command(services["sandbox"])
    ports["sandbox"] = {int(_flag(sandbox, "--port") or 0), int(_flag(sandbox, "--posthog-port") or 0)}
    col: set[int] = set()
    for proto in collector["receivers"]["otlp"]["protocols"].values():
        col.add(_host_port(proto["endpoint"])[1])
    for cid, cfg in collector["exporters"].items():
        if _component_type(cid) == "prometheus":
            col.add(_host_port(cfg["endpoint"])[1])
    ports["otel-collector"] = col
    return ports


def _pipelines(collector: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    return collector["service"]["pipelines"]


# -- docker-compose.yml -----------------------------------------------------------------------


def test_compose_defines_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "jaeger", "otel-collector", "sandbox", "canary"} <= set(services)


def test_compose_referenced_files_exist(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing in {context}"
            checked += 1
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):  # a bind mount, not a named volume
                assert (ROOT / source).exists(), f"{name}: mounted {source} does not exist"
                checked += 1
    assert checked >= 3  # two builds + the collector config


def test_canary_spec_file_is_in_the_image(
    services: dict[str, dict[str, Any]], dockerfile: list[tuple[str, str]]
) -> None:
    """`-c /app/...` must name a file the Dockerfile copies from the build context into /app."""
    workdir_copies = [args for op, args in dockerfile if op == "COPY"]
    assert any(re.fullmatch(r"\.\s+(/app/?|\.)", args) for args in workdir_copies), (
        "Dockerfile must COPY . /app"
    )
    cmd_paths = [_flag(_command(services["canary"]), "-c")]
    cmd_paths += [_flag(_exec_form(args), "-c") for op, args in dockerfile if op == "CMD"]
    patterns = _dockerignore_patterns()
    for in_image in cmd_paths:
        assert in_image and in_image.startswith("/app/"), f"spec path {in_image!r} is not under /app"
        rel = in_image.removeprefix("/app/")
        assert (ROOT / rel).is_file(), f"{rel} (mounted as {in_image}) does not exist"
        assert not _dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"


def test_collector_config_is_mounted_where_the_image_reads_it(services: dict[str, dict[str, Any]]) -> None:
    svc = services["otel-collector"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    # An explicit --config in the service's command would override the image's default path.
    target = _flag(_command(svc), "--config") if "command" in svc else COLLECTOR_IMAGE_CONFIG_PATH
    assert target in mounts, f"collector reads {target}, mounts are {mounts}"
    assert (ROOT / mounts[target]).resolve() == COLLECTOR_FILE


def test_every_image_is_pinned(
    services: dict[str, dict[str, Any]], dockerfile: list[tuple[str, str]]
) -> None:
    for name, svc in services.items():
        if "build" in svc:
            continue  # built here; its base image is checked below
        repo, tag = _image_ref(svc["image"])
        assert _pinned(tag), f"{name}: image {svc['image']!r} is not pinned to a version tag"
    froms = [args.split()[0] for op, args in dockerfile if op == "FROM"]
    assert froms, "Dockerfile has no FROM"
    for ref in froms:
        assert _pinned(_image_ref(ref)[1]), f"Dockerfile base {ref!r} is not pinned to a version tag"


def test_pinned_versions_match_what_was_checked(services: dict[str, dict[str, Any]]) -> None:
    repo, tag = _image_ref(services["otel-collector"]["image"])
    assert repo == COLLECTOR_IMAGE
    assert tag == CONTRIB_VERSION, f"collector image {tag} but the component list is for {CONTRIB_VERSION}"
    repo, tag = _image_ref(services["jaeger"]["image"])
    assert repo == "jaegertracing/jaeger" and tag and tag.split(".")[0] == "2", (
        "Jaeger must be a pinned v2 image"
    )
    # Both images are the releases deploy/build-binaries.sh builds (what the e2e tests ran).
    script = (ROOT / "deploy" / "build-binaries.sh").read_text(encoding="utf-8")
    assert re.search(rf"^OTELCOL_VERSION={re.escape(CONTRIB_VERSION)}\b", script, re.M)
    assert re.search(rf"^JAEGER_VERSION=v{re.escape(tag)}\b", script, re.M), f"jaeger image {tag}"


def test_canary_environment(services: dict[str, dict[str, Any]]) -> None:
    env = services["canary"]["environment"]
    env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "funnel-tracer"
    assert "canary.location=compose" in env["OTEL_RESOURCE_ATTRIBUTES"].split(",")


def test_otlp_endpoints_match_protocol_and_receiver(
    services: dict[str, dict[str, Any]], collector: dict[str, Any]
) -> None:
    """Every service exporting OTLP (the canary, and the sandbox for its own spans) sends to the
    collector's receiver for the protocol it speaks."""
    exporting = {
        n: s["environment"]
        for n, s in services.items()
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in s.get("environment", {})
    }
    assert {"canary", "sandbox"} <= set(exporting)
    for name, env in exporting.items():
        protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # the OTel spec's default
        host, port = _host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        receiver = "http" if protocol.startswith("http") else "grpc"
        endpoint = collector["receivers"]["otlp"]["protocols"][receiver]["endpoint"]
        assert host == "otel-collector", f"{name} exports to {host}"
        assert port == _host_port(endpoint)[1], (
            f"{name}: {protocol} goes to :{port}, the {receiver} receiver is {endpoint}"
        )


def test_every_host_the_stack_points_at_is_a_compose_service(
    services: dict[str, dict[str, Any]], collector: dict[str, Any]
) -> None:
    """Hosts in the canary's env, the sandbox's command, the canary spec and the collector's
    exporters are compose services, on ports those services listen on."""
    targets: list[tuple[str, str]] = []
    for name in ("canary", "sandbox"):
        svc = services[name]
        targets += [(name, u) for u in _urls_in(svc.get("environment", {}))]
        targets += [(name, u) for u in _urls_in(" ".join(_command(svc)))]
    spec = _interpolate(_load_yaml(SPEC_FILE), _COMPOSE_VAR)
    targets += [("examples/compose.yaml", u) for u in _urls_in(spec)]
    for cid, cfg in collector["exporters"].items():
        if _component_type(cid) in ("otlp_grpc", "otlp_http", "otlp", "otlphttp"):
            targets.append((f"collector {cid}", cfg["endpoint"]))
    hosts = {_host_port(u)[0] for _, u in targets}
    assert {"otel-collector", "sandbox", "redis", "jaeger"} <= hosts, hosts
    ports = _service_ports(services, collector)
    for where, url in targets:
        host, port = _host_port(url)
        assert host in services, f"{where}: {url} points at {host!r}, not a compose service"
        assert port in ports.get(host, set()), (
            f"{where}: {url}: {host} listens on {sorted(ports.get(host, ()))}"
        )


def test_built_services_do_not_repeat_the_entrypoint(
    services: dict[str, dict[str, Any]], dockerfile: list[tuple[str, str]]
) -> None:
    entrypoint = [_exec_form(args) for op, args in dockerfile if op == "ENTRYPOINT"][-1]
    assert entrypoint == ["funnel-tracer"]
    for name, sub in (("sandbox", "sandbox"), ("canary", "canary")):
        cmd = _command(services[name])
        assert cmd and cmd[0] == sub, (
            f"{name}: command must start at the subcommand (ENTRYPOINT is funnel-tracer): {cmd}"
        )
    sandbox = _command(services["sandbox"])
    assert _flag(sandbox, "--host") == "0.0.0.0", "the sandbox must listen beyond the container's loopback"
    assert _flag(sandbox, "--redis-url"), "the sandbox needs the redis service for the DLQ"


def test_health_conditions_have_healthchecks(
    services: dict[str, dict[str, Any]], dockerfile: list[tuple[str, str]]
) -> None:
    image_has_healthcheck = any(op == "HEALTHCHECK" for op, _ in dockerfile)
    seen = 0
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on undefined {dep}"
            if cond.get("condition") == "service_healthy":
                target = services[dep]
                has = "healthcheck" in target or ("build" in target and image_has_healthcheck)
                assert has and not target.get("healthcheck", {}).get("disable"), (
                    f"{name} waits for {dep} to be healthy; it has no healthcheck"
                )
                seen += 1
    assert seen >= 3
    assert services["canary"]["depends_on"]["sandbox"]["condition"] == "service_healthy"
    assert "healthcheck" not in services["otel-collector"], (
        "the contrib image has no shell to run a healthcheck"
    )


def test_canary_healthcheck_hits_healthz(services: dict[str, dict[str, Any]]) -> None:
    test = " ".join(services["canary"]["healthcheck"]["test"])
    assert f"127.0.0.1:{CANARY_HTTP_PORT}/healthz" in test
    assert "curl" not in test and "wget" not in test, "slim python images have neither curl nor wget"


def test_published_ports_match_the_documented_table(services: dict[str, dict[str, Any]]) -> None:
    """docs/DEPLOY.md's "## Ports" table lists exactly the published host ports, with their service."""
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    section = doc.split("\n## Ports", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([\w-]+)\s*\|", section, flags=re.MULTILINE)
    documented = {(int(port), svc) for port, svc in rows}
    published = set()
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            parts = str(mapping).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: publish {mapping} on 127.0.0.1 only"
            published.add((int(parts[1]), name))
    assert documented == published, (
        f"docs/DEPLOY.md ports table {sorted(documented)} != compose {sorted(published)}"
    )


# -- otel-collector.yaml ----------------------------------------------------------------------


def test_collector_config_sections(collector: dict[str, Any]) -> None:
    assert set(collector) <= {"receivers", "processors", "exporters", "connectors", "extensions", "service"}
    assert {"receivers", "exporters", "service"} <= set(collector)
    assert _pipelines(collector), "no pipelines"


def test_collector_components_exist_in_pinned_contrib(collector: dict[str, Any]) -> None:
    for kind, known in CONTRIB_COMPONENTS.items():
        for cid in collector.get(kind) or {}:
            ctype = _component_type(cid)
            deprecated = DEPRECATED_TYPES.get(kind, {}).get(ctype)
            assert deprecated is None, (
                f"{kind}.{cid}: '{ctype}' is deprecated in {CONTRIB_VERSION}; use '{deprecated}'"
            )
            assert ctype in known, (
                f"{kind}.{cid}: '{ctype}' is not in the contrib {CONTRIB_VERSION} list ({CONTRIB_MANIFEST_URL})"
            )
    for ext in collector["service"].get("extensions", []):
        assert ext in (collector.get("extensions") or {}), f"service.extensions names undefined {ext}"


def test_pipelines_reference_defined_components(collector: dict[str, Any]) -> None:
    connectors = set(collector.get("connectors") or {})
    used: set[tuple[str, str]] = set()
    for pname, p in _pipelines(collector).items():
        signal = pname.split("/", 1)[0]
        assert signal in ("traces", "metrics", "logs", "profiles"), f"pipeline {pname}: unknown signal"
        assert p.get("receivers") and p.get("exporters"), f"pipeline {pname} needs receivers and exporters"
        for r in p["receivers"]:
            assert r in (collector.get("receivers") or {}) or r in connectors, (
                f"{pname}: undefined receiver {r}"
            )
            used.add(("connectors" if r in connectors else "receivers", r))
        for proc in p.get("processors", []):
            assert proc in (collector.get("processors") or {}), f"{pname}: undefined processor {proc}"
            used.add(("processors", proc))
        for e in p["exporters"]:
            assert e in collector["exporters"] or e in connectors, f"{pname}: undefined exporter {e}"
            used.add(("connectors" if e in connectors else "exporters", e))
    for kind in ("receivers", "processors", "exporters", "connectors"):
        for cid in collector.get(kind) or {}:
            assert (kind, cid) in used, f"{kind}.{cid} is defined but no pipeline uses it"


def test_connectors_bridge_two_pipelines(collector: dict[str, Any]) -> None:
    pipelines = _pipelines(collector)
    connectors = collector.get("connectors") or {}
    assert connectors, "expected the span metrics connector"
    for cid in connectors:
        as_exporter = [p for p, cfg in pipelines.items() if cid in cfg["exporters"]]
        as_receiver = [p for p, cfg in pipelines.items() if cid in cfg["receivers"]]
        assert as_exporter and as_receiver, (
            f"connector {cid}: exporter in {as_exporter}, receiver in {as_receiver}"
        )
        assert set(as_exporter).isdisjoint(as_receiver), f"connector {cid} feeds its own pipeline"
        signals = CONNECTOR_SIGNALS.get(_component_type(cid))
        if signals:
            assert {p.split("/")[0] for p in as_exporter} == {signals[0]}, f"{cid} consumes {signals[0]}"
            assert {p.split("/")[0] for p in as_receiver} == {signals[1]}, f"{cid} emits {signals[1]}"


def test_receivers_listen_beyond_localhost(collector: dict[str, Any]) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    assert _host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert _host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)


def test_memory_limiter(collector: dict[str, Any]) -> None:
    cfg = collector["processors"]["memory_limiter"]
    assert _go_duration_s(cfg["check_interval"]) > 0, "check_interval is required (must be > 0)"
    assert cfg.get("limit_mib") or cfg.get("limit_percentage"), "a memory limit is required"
    if cfg.get("limit_percentage"):
        assert cfg.get("spike_limit_percentage", 0) < cfg["limit_percentage"] <= 100
    for pname, p in _pipelines(collector).items():
        procs = p.get("processors", [])
        assert procs and procs[0] == "memory_limiter", f"{pname}: memory_limiter must come first"


def test_batch_runs_last(collector: dict[str, Any]) -> None:
    for pname, p in _pipelines(collector).items():
        procs = p.get("processors", [])
        if "batch" in procs:
            assert procs[-1] == "batch", f"{pname}: batch must be the last processor"


def test_tail_sampling_keeps_every_non_ok_verdict(collector: dict[str, Any]) -> None:
    from tracer.verdict import OK, VERDICTS

    policies = collector["processors"]["tail_sampling"]["policies"]
    keep = [p for p in policies if p["type"] == "string_attribute"]
    assert len(keep) == 1
    cfg = keep[0]["string_attribute"]
    assert cfg["key"] == "funnel.verdict"
    # invert_match on [ok] would sample only traces with NO ok span, dropping e.g. ok + lost hops.
    assert not cfg.get("invert_match") and not cfg.get("enabled_regex_matching")
    assert set(cfg["values"]) == set(VERDICTS) - {OK}, "the kept verdicts must be every verdict but ok"
    assert _go_duration_s(collector["processors"]["tail_sampling"]["decision_wait"]) > 0


def test_tail_sampling_waits_for_the_slowest_probe(collector: dict[str, Any]) -> None:
    """The funnel's spans reach the collector at injection, the canary's verdict spans when the
    probe resolves (largest hop deadline + the collector's >= 5 s grace). Deciding earlier than
    that judges the trace without a verdict."""
    from tracer.spec import load_spec

    spec = load_spec(str(SPEC_FILE))
    slowest = max(spec.deadline(h) for step in spec.steps.values() for h in step.hops) + 5.0
    cfg = collector["processors"]["tail_sampling"]
    assert _go_duration_s(cfg["decision_wait"]) >= slowest + 5.0, (
        f"decision_wait must outlast a {slowest:g}s probe"
    )
    assert _go_duration_s(cfg.get("decision_wait_after_root_received", "0s")) > 0, (
        "decide soon after the root span"
    )


def test_tail_sampling_samples_a_fraction_of_ok(collector: dict[str, Any]) -> None:
    policies = collector["processors"]["tail_sampling"]["policies"]
    prob = [p for p in policies if p["type"] == "probabilistic"]
    assert len(prob) == 1
    pct = float(prob[0]["probabilistic"]["sampling_percentage"])  # the config's own default
    assert 0 < pct < 100, f"ok traces: sample a fraction, not {pct}%"
    assert {p["type"] for p in policies} == {"string_attribute", "probabilistic"}
    assert len({p["name"] for p in policies}) == len(policies), "policy names must be unique"


def test_span_metrics_see_every_span_before_sampling(collector: dict[str, Any]) -> None:
    pipelines = _pipelines(collector)
    feeding = [p for p, cfg in pipelines.items() if "span_metrics" in cfg["exporters"]]
    assert feeding
    for pname in feeding:
        assert "tail_sampling" not in pipelines[pname].get("processors", []), (
            f"{pname} samples before span_metrics"
        )
    sampled_to_jaeger = [p for p, cfg in pipelines.items() if "otlp_grpc/jaeger" in cfg["exporters"]]
    assert sampled_to_jaeger and all("tail_sampling" in pipelines[p]["processors"] for p in sampled_to_jaeger)


def test_span_metrics_dimensions_and_buckets(collector: dict[str, Any]) -> None:
    cfg = collector["connectors"]["span_metrics"]
    dims = {d["name"] for d in cfg["dimensions"]}
    assert {"funnel.step", "funnel.hop", "funnel.verdict"} <= dims
    assert cfg["histogram"]["unit"] == "s"
    buckets = [_go_duration_s(b) for b in cfg["histogram"]["explicit"]["buckets"]]
    assert buckets == sorted(set(buckets)), "buckets must be strictly increasing"
    spec = _load_yaml(SPEC_FILE)
    spec_targets = {_go_duration_s(h["target"]) for s in spec["steps"].values() for h in s["hops"]}
    for target in sorted(set(SLO_TARGETS_S) | spec_targets):
        assert target in buckets, f"SLO target {target:g}s is not a bucket bound"
        assert any(0.5 * target <= b < target for b in buckets), f"no bucket just below {target:g}s"
        assert any(target < b <= 1.5 * target for b in buckets), f"no bucket just above {target:g}s"


def test_metrics_pipeline_exports_canary_and_span_metrics(
    collector: dict[str, Any], services: dict[str, Any]
) -> None:
    metrics = [cfg for p, cfg in _pipelines(collector).items() if p.split("/")[0] == "metrics"]
    receivers = {r for cfg in metrics for r in cfg["receivers"]}
    exporters = {e for cfg in metrics for e in cfg["exporters"]}
    assert {"otlp", "span_metrics"} <= receivers
    assert "prometheus" in exporters
    port = _host_port(collector["exporters"]["prometheus"]["endpoint"])[1]
    assert port == 8889
    published = [str(m).split(":")[-1] for m in services["otel-collector"].get("ports", [])]
    assert str(port) in published, "the Prometheus endpoint is not published"


def test_jaeger_exporter(collector: dict[str, Any]) -> None:
    cfg = collector["exporters"]["otlp_grpc/jaeger"]
    assert _host_port(cfg["endpoint"]) == ("jaeger", 4317)
    assert cfg["tls"]["insecure"] is True


# -- Dockerfile, .dockerignore, spec ----------------------------------------------------------


def test_dockerfile_runs_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    users = [args for op, args in dockerfile if op == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"
    created = " ".join(args for op, args in dockerfile if op == "RUN")
    assert user.isdigit() or re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", created), (
        f"user {user} is never created"
    )


def test_dockerfile_healthcheck_and_port(dockerfile: list[tuple[str, str]]) -> None:
    checks = [args for op, args in dockerfile if op == "HEALTHCHECK"]
    assert len(checks) == 1 and "NONE" not in checks[0].split()
    options, sep, cmd = f" {checks[0]}".partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {checks[0]}"
    argv = _exec_form(cmd.strip())
    assert argv[0].startswith("python"), "probe with python: no curl/wget in slim images"
    assert f"127.0.0.1:{CANARY_HTTP_PORT}/healthz" in " ".join(argv)
    exposed = {p.split("/")[0] for op, args in dockerfile if op == "EXPOSE" for p in args.split()}
    assert str(CANARY_HTTP_PORT) in exposed


def test_dockerfile_entrypoint_cmd_and_install(dockerfile: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = pyproject["project"]["scripts"]
    assert [_exec_form(a) for op, a in dockerfile if op == "ENTRYPOINT"][-1] == ["funnel-tracer"]
    assert "funnel-tracer" in scripts, "the ENTRYPOINT is the package's console script"
    assert [_exec_form(a) for op, a in dockerfile if op == "CMD"][-1] == [
        "canary",
        "-c",
        "/app/examples/compose.yaml",
    ]
    runs = " ".join(args for op, args in dockerfile if op == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs)
    base = [args for op, args in dockerfile if op == "FROM"][0]
    assert re.match(r"python:3\.(1[0-9])[.\w-]*-slim", base), f"slim Python >= 3.10 base expected, got {base}"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = _dockerignore_patterns()
    for must_exclude in (".venv", ".git", ".pytest_cache", "test-artifacts", "tracer/__pycache__"):
        assert _dockerignored(must_exclude, patterns), (
            f"{must_exclude} should be excluded from the build context"
        )
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = ["pyproject.toml", pyproject["project"]["readme"], "examples/compose.yaml"]
    needed += [pat.rstrip("*") for pat in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for rel in needed:
        assert (ROOT / rel).exists(), f"{rel} is needed by the image build but missing"
        assert not _dockerignored(rel, patterns), (
            f"{rel} is needed by the image build but .dockerignore excludes it"
        )


def test_compose_spec_loads_and_targets_the_sandbox() -> None:
    from tracer.spec import load_spec

    spec = load_spec(str(SPEC_FILE))
    assert "lead" in spec.steps
    assert (
        spec.collectors.posthog is not None and urlsplit(spec.collectors.posthog.host).hostname == "sandbox"
    )
    lead = spec.steps["lead"]
    assert lead.inject.http is not None and urlsplit(lead.inject.http.url).hostname == "sandbox"
    assert [h.sink for h in lead.hops] == ["posthog"]
