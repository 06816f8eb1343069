"""Isolated environments for metrics whose packages clash with bench's own (VBench, ImageReward,
HPSv2): bench creates each one as a virtual environment with that package's own pins and runs the
package's own code in it as a subprocess. The main environment never imports these packages.

An environment lives in ``$BENCH_ENVS/<name>`` (default ``$BENCH_HOME/envs/<name>``), made with
``python -m venv --without-pip`` and bench's own pip installing its spec's requirements into it
(``pip --python``: the same pip, configuration and constraints as bench's environment). Setting it up is idempotent
and resumable:

- a ready environment (its manifest ``bench-env.json`` is there and records the spec's key) is
  left as it is;
- a half-made one (the directory without a manifest: setup was interrupted) is resumed: pip is run
  again into it (pip keeps what is already installed), or it is made afresh if its interpreter is
  broken;
- a stale one (the manifest records other requirements) is removed and made again.

The manifest, written last and atomically, records the requirements, the interpreter, what pip
installed (``pip freeze``), when and in how many seconds. A file lock keeps two processes (two Ray
workers, say) from building the same environment at once.

:func:`run_worker` runs a worker script (stdlib-only at its top level; it imports its package
inside) with the environment's interpreter: the request and the result travel as JSON files in a
temporary directory beside the samples (``.npy``/``.png``/``.mp4`` files). A worker reports missing
weights as ``{"ok": false, "error": "missing_weights", "message": ...}``, which becomes
:class:`~bench.weights.MissingWeightsError` here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.paths import bench_home

MANIFEST = "bench-env.json"
FORMAT = 1  # bump when the way environments are made changes


class EnvError(Exception):
    """An isolated environment is missing, stale or could not be made (the message names the fix)."""


class EnvMissingError(EnvError):
    """The environment a metric runs in has not been set up."""


class EnvWorkerError(RuntimeError):
    """A worker in an isolated environment failed (the message holds the end of its stderr)."""


@dataclass(frozen=True)
class EnvSpec:
    """One isolated environment: what pip installs into it, the modules that must import once it
    is made (the check that it is complete), an optional Python snippet run in it after pip (a fix
    to a published package), and the command that makes it."""

    name: str
    description: str
    requirements: tuple[str, ...]
    imports: tuple[str, ...] = ()
    post_install: str = ""
    setup_command: str = ""
    worker_env: dict[str, str] = field(default_factory=dict)  # extra variables every worker run gets

    @property
    def command(self) -> str:
        return self.setup_command or f"bench env setup {self.name}"

    def key(self) -> str:
        """Hash of everything that determines the environment's contents."""
        doc = {
            "format": FORMAT,
            "requirements": list(self.requirements),
            "imports": list(self.imports),
            "post_install": self.post_install,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# Pins come from each package's own metadata on PyPI; torch and torchvision are left to pip (the
# packages do not pin them), so an environment gets the newest release pip finds.
_HPS_BPE_FIX = """
import importlib.util, pathlib, shutil
hps = pathlib.Path(importlib.util.find_spec("hpsv2").origin).parent / "src" / "open_clip"
oc = pathlib.Path(importlib.util.find_spec("open_clip").origin).parent
name = "bpe_simple_vocab_16e6.txt.gz"
if not (hps / name).is_file():  # hpsv2 1.2.0's wheel omits the tokenizer vocabulary its repository holds
    shutil.copyfile(oc / name, hps / name)
"""

# openai-clip (imported by vbench and ImageReward) imports pkg_resources, which setuptools 81 removed
_SETUPTOOLS = "setuptools<81"
# the modules of the dimensions vbench evaluates on custom input: each must import once the env is made
_VBENCH_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
    "human_action",
    "temporal_style",
    "overall_consistency",
)

ENVS: dict[str, EnvSpec] = {
    s.name: s
    for s in [
        EnvSpec(
            "vbench",
            "VBench 0.1.5 (Huang et al. 2024), video generation benchmark: its own pins "
            "(transformers 4.33.2, numpy<2, timm<=1.0.12)",
            ("vbench==0.1.5", "torch", "torchvision", _SETUPTOOLS),
            imports=("vbench", "cv2", "decord", *(f"vbench.{d}" for d in _VBENCH_DIMENSIONS)),
            setup_command="bench vbench setup",
        ),
        EnvSpec(
            "imagereward",
            "ImageReward 1.5 (Xu et al. 2023), BLIP-based human-preference reward: its own pins "
            "(timm 0.6.13, fairscale 0.4.13) and a transformers whose BLIP internals it imports",
            # ImageReward imports `clip` without declaring it, and at its import diffusers (ReFL), whose
            # releases of transformers 4.33's time (0.21) import huggingface_hub's cached_download (gone in 0.26)
            (
                "image-reward==1.5",
                "transformers==4.33.2",
                "diffusers==0.21.4",
                "huggingface-hub<0.26",
                "numpy<2",
                "pyarrow<18",  # datasets (imported by ImageReward) imports pyarrow; newer ones need numpy 2
                "openai-clip",
                "torch",
                "torchvision",
                _SETUPTOOLS,
            ),
            imports=("ImageReward",),
            worker_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        ),
        EnvSpec(
            "hpsv2",
            "HPSv2 1.2.0 (Wu et al. 2023), human preference score v2/v2.1 on an open_clip ViT-H/14",
            ("hpsv2==1.2.0", "open_clip_torch", "torch", "torchvision"),
            imports=("hpsv2", "hpsv2.img_score"),
            post_install=_HPS_BPE_FIX,
            worker_env={"HF_HUB_OFFLINE": "1"},
        ),
    ]
}


def spec(name: str) -> EnvSpec:
    if name not in ENVS:
        from bench.registry import UnknownNameError

        raise UnknownNameError("environment", name, list(ENVS))
    return ENVS[name]


def envs_root() -> Path:
    """``$BENCH_ENVS``, else ``$BENCH_HOME/envs``."""
    return Path(os.environ["BENCH_ENVS"]).expanduser() if os.environ.get("BENCH_ENVS") else bench_home() / "envs"


def env_path(name: str) -> Path:
    return envs_root() / name


def env_python(name: str) -> Path:
    return env_path(name) / "bin" / "python"


def read_manifest(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((env_path(name) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class EnvStatus:
    name: str
    path: Path
    state: str  # "ready" | "absent" | "incomplete" | "stale"
    manifest: dict[str, Any] | None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def status(name: str) -> EnvStatus:
    s, p = spec(name), env_path(name)
    m = read_manifest(name)
    if not p.exists():
        state = "absent"
    elif m is None:
        state = "incomplete"
    elif m.get("key") != s.key():
        state = "stale"
    elif not env_python(name).is_file():
        state = "incomplete"
    else:
        state = "ready"
    return EnvStatus(name, p, state, m)


def require(name: str) -> Path:
    """The interpreter of ready environment ``name``; :class:`EnvMissingError` naming the command
    that makes it otherwise."""
    st = status(name)
    if st.ready:
        return env_python(name)
    s = spec(name)
    why = {
        "absent": "has not been set up",
        "incomplete": "was left half-made (its setup was interrupted)",
        "stale": "was made with other requirements than bench now pins",
    }[st.state]
    raise EnvMissingError(f"the isolated environment {name!r} ({s.description}) at {st.path} {why}. Make it with `{s.command}`")


@contextmanager
def _lock(name: str) -> Iterator[None]:
    root = envs_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without what would let the main environment leak into the
    isolated one (PYTHONPATH, PYTHONHOME, VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra or {})
    return env


def _run(cmd: list[str], what: str, log: Callable[[str], None], timeout: float | None = None) -> str:
    log(f"$ {' '.join(cmd)}")
    r = subprocess.run(cmd, capture_output=True, text=True, env=_clean_environ(), timeout=timeout)
    if r.returncode != 0:
        tail = (r.stdout[-2000:] + "\n" + r.stderr[-4000:]).strip()
        raise EnvError(f"{what} failed (exit {r.returncode}):\n{tail}")
    return r.stdout


# `pip freeze` without pip in the environment: every installed distribution as name==version
_FREEZE = (
    "import importlib.metadata as md; "
    "print('\\n'.join(sorted({f\"{d.metadata['Name']}=={d.version}\" for d in md.distributions()}, key=str.lower)))"
)


def _base_python() -> str:
    """The interpreter venv is run with: the base installation of this Python (not its venv)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.is_file() else sys.executable


def _interpreter_works(name: str) -> bool:
    py = env_python(name)
    if not py.is_file():
        return False
    try:
        return (
            subprocess.run([str(py), "-c", "import sys"], capture_output=True, env=_clean_environ(), timeout=60).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def setup(name: str, force: bool = False, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Make environment ``name`` (see the module docstring); returns its manifest."""
    s = spec(name)
    with _lock(name):
        st = status(name)
        if st.ready and not force:
            log(f"{name}: ready at {st.path} (made {st.manifest['created_utc']}, {st.manifest['setup_seconds']:.0f} s)")
            return st.manifest  # type: ignore[return-value]
        p = env_path(name)
        if st.state == "stale" or force or (st.state == "incomplete" and not _interpreter_works(name)):
            log(f"{name}: removing {p} ({'forced' if force else st.state})")
            shutil.rmtree(p, ignore_errors=True)
        resumed = p.exists()
        t0 = time.perf_counter()
        if not resumed:  # without pip: bench's own pip installs into it (`pip --python`), 50x faster to make
            _run([_base_python(), "-m", "venv", "--without-pip", str(p)], f"creating the virtual environment {p}", log)
        else:
            log(f"{name}: resuming the half-made environment at {p}")
        py = str(env_python(name))
        if s.requirements:
            _run(
                [sys.executable, "-m", "pip", "--python", py, "install", "--disable-pip-version-check", *s.requirements],
                f"pip install {' '.join(s.requirements)} into {p}",
                log,
            )
        if s.post_install.strip():
            _run([py, "-c", s.post_install], f"the post-install step of {name}", log)
        if s.imports:
            _run([py, "-c", "; ".join(f"import {m}" for m in s.imports)], f"importing {', '.join(s.imports)} in {name}", log)
        freeze = _run([py, "-c", _FREEZE], f"listing what is installed in {p}", log).split()
        version = _run([py, "-c", "import sys; print(sys.version.split()[0])"], "the interpreter's version", log).strip()
        manifest = {
            "name": name,
            "key": s.key(),
            "requirements": list(s.requirements),
            "python": version,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "setup_seconds": round(time.perf_counter() - t0, 1),
            "resumed": resumed,
            "freeze": freeze,
        }
        tmp = p / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, p / MANIFEST)
        log(f"{name}: ready at {p} in {manifest['setup_seconds']:.0f} s")
        return manifest


def installed_version(name: str, package: str) -> str | None:
    """The version of ``package`` recorded in environment ``name``'s manifest."""
    m = read_manifest(name) or {}
    key = package.lower().replace("_", "-")
    for line in m.get("freeze", []):
        pkg, _, ver = line.partition("==")
        if pkg.lower().replace("_", "-") == key:
            return ver
    return None


def run_worker(
    name: str,
    script: Path,
    request: dict[str, Any],
    workdir: Path | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``script`` with environment ``name``'s interpreter on ``request`` and return its result.

    The script is called as ``python -I script request.json result.json`` in ``workdir`` (a fresh
    temporary directory if None; the caller puts the sample files there and names them in the
    request). Raises :class:`EnvMissingError` if the environment is not ready,
    :class:`~bench.weights.MissingWeightsError` if the worker reports missing weights
    (:class:`~bench.io.WeightsError` if it reports a failed download),
    :class:`EnvWorkerError` if it fails otherwise.
    """
    py = require(name)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        req, res = wd / "request.json", wd / "result.json"
        req.write_text(json.dumps(request))
        res.unlink(missing_ok=True)
        cmd = [str(py), "-I", str(script), str(req), str(res)]
        try:
            r = subprocess.run(
                cmd,
                cwd=wd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_clean_environ({**spec(name).worker_env, **(env or {})}),
            )
        except subprocess.TimeoutExpired as e:
            raise EnvWorkerError(f"{Path(script).name} in environment {name!r} ran past {timeout} s") from e
        result = json.loads(res.read_text()) if res.is_file() else None
    if result is not None and not result.get("ok", False):
        if result.get("error") in ("missing_weights", "fetch_failed"):
            from bench.weights import MissingWeightsError, WeightsError

            raise (MissingWeightsError if result["error"] == "missing_weights" else WeightsError)(result["message"])
        raise EnvWorkerError(f"{Path(script).name} in environment {name!r}: {result.get('message')}\n{r.stderr[-3000:]}")
    if r.returncode != 0 or result is None:
        raise EnvWorkerError(
            f"{Path(script).name} in environment {name!r} failed (exit {r.returncode}) without a result:\n{r.stderr[-4000:]}"
        )
    return result


__all__ = [
    "ENVS",
    "EnvError",
    "EnvMissingError",
    "EnvSpec",
    "EnvStatus",
    "EnvWorkerError",
    "env_path",
    "env_python",
    "envs_root",
    "installed_version",
    "read_manifest",
    "require",
    "run_worker",
    "setup",
    "spec",
    "status",
]
