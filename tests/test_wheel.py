"""The package works installed from a wheel, away from this checkout.

One module fixture builds the wheel from a copy of the sources (setuptools' build/ folder keeps
files deleted since an earlier build, so building in the checkout could ship stale modules),
installs it into a fresh virtualenv outside the checkout and runs everything from a folder outside
the checkout without PYTHONPATH. That venv has no system site packages: the base interpreter's
site-packages (which on a fresh machine hold no torch) must stay out of it. Torch, megatron-core
and the rest come from this interpreter's own site-packages (the project's .venv), named by a
plain .pth line, so the .pth files there are not run and the checkout's editable install stays
out too; each test still asserts that ``megatron_less`` is the venv's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny

REPO = Path(__file__).resolve().parents[1]
# What setup.py packages: everything else in the checkout stays out of the copy.
SOURCES = ["setup.py", "pyproject.toml", "README.md", "megatron_less"]
REQUIRED_COMMANDS = ["eval", "convert-hf", "export-hf", "prepare-data"]


def _run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"  # megatron's apex/TE notices: noise in the checked output
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "dist"), str(src)], cwd=root)
    (wheel,) = (root / "dist").glob("megatron_less-*.whl")
    # No --system-site-packages: that would borrow the *base* interpreter's packages, not this
    # interpreter's. A .pth line adds this interpreter's site-packages (torch, megatron-core, pip)
    # after the venv's own; pip then installs into the venv (--ignore-installed: this
    # interpreter's record of the editable install does not count).
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    venv_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root)
    (Path(venv_site.strip()) / "_borrowed_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          str(wheel)], cwd=root)
    work = root / "work"  # cwd of every command: outside the checkout, so nothing leaks from it
    work.mkdir()
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work)
    commands = _run([str(python), "-c", "from megatron_less.cli import COMMANDS; print(*COMMANDS)"], work)
    return dict(root=root, src=src, wheel=wheel, python=python, bin=python.parent,
                site=Path(site.strip()), work=work, commands=commands.split())


def test_wheel_holds_exactly_the_package_sources(venv):
    with zipfile.ZipFile(venv["wheel"]) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
        assert "megatron_less/demo/demo.yaml" in z.namelist()  # package data: `megatron-less demo` reads it
    sources = {str(p.relative_to(venv["src"])) for p in (venv["src"] / "megatron_less").rglob("*.py")}
    assert shipped == sources  # no tools/ or tests/, no stale modules, no subpackage left out


def _base_site_packages() -> set[str]:
    """The base interpreter's site-packages folders (and the user site), as this venv's ``site``
    would add them with system site packages on."""
    import site

    base = {sys.base_prefix, sys.base_exec_prefix}
    paths = set(site.getsitepackages(list(base)))
    paths |= {sysconfig.get_path(k, vars={"base": b, "platbase": b}) for k in ("purelib", "platlib") for b in base}
    if site.USER_SITE:
        paths.add(site.USER_SITE)
    return {os.path.realpath(p) for p in paths}


def test_venv_sees_no_base_site_packages(venv):
    path = json.loads(_run([str(venv["python"]), "-c", "import json, sys; print(json.dumps(sys.path))"], venv["work"]))
    base = _base_site_packages()
    assert base, "no base site-packages found to check against"
    leaked = [p for p in path if p and os.path.realpath(p) in base]
    assert not leaked, f"the wheel's venv sees the base interpreter's site-packages: {leaked}"
    # torch and megatron-core come from this interpreter's own site-packages (the .venv)
    code = "import torch, megatron.core; print(torch.__file__); print(megatron.core.__file__)"
    own = Path(sysconfig.get_path("purelib")).resolve()
    for f in _run([str(venv["python"]), "-c", code], venv["work"]).split():
        assert Path(f).resolve().is_relative_to(own), f


def test_package_is_imported_from_the_venv(venv):
    code = ("import megatron_less, megatron_less.checkpoints.convert as c; "
            "print(megatron_less.__file__); print(c.__file__)")
    for path in _run([str(venv["python"]), "-c", code], venv["work"]).split():
        assert Path(path).is_relative_to(venv["site"]), path
        assert not Path(path).is_relative_to(REPO), path


def test_every_command_has_help(venv):
    exe = str(venv["bin"] / "megatron-less")
    commands = venv["commands"]
    assert set(REQUIRED_COMMANDS) <= set(commands)
    assert all(c in _run([exe, "--help"], venv["work"]) for c in commands)
    # each --help imports its command's modules (torch, megatron): run them side by side
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {c: subprocess.Popen([exe, c, "--help"], cwd=venv["work"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands}
    for c, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"megatron-less {c} --help: {err[-3000:]}"
        assert out.startswith(f"usage: megatron-less {c}"), out[:200]


def test_conversion_round_trip_is_bit_exact(venv):
    hf_dir = venv["root"] / "hf"
    tiny.save_hf_model(hf_dir, seed=2, tie_word_embeddings=False)
    exe = str(venv["bin"] / "megatron-less")
    ckpt, back = venv["root"] / "meg", venv["root"] / "back"
    assert "wrote megatron checkpoint" in _run(
        [exe, "convert-hf", "--hf-dir", str(hf_dir), "--out", str(ckpt)], venv["work"])
    assert "wrote HF checkpoint" in _run(
        [exe, "export-hf", "--ckpt", str(ckpt), "--out", str(back)], venv["work"])
    orig, got = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(got) == set(orig)
    for name, t in orig.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
