"""The documentation: the site builds strictly, the configuration reference is the one generated from
the config models and names every key, and the README stays one page whose links resolve."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def generator():
    """docs/gen_config_reference.py as a module (docs/ is not a package)."""
    if "gen_config_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "docs" / "gen_config_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass resolves its annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["gen_config_reference"]


def test_the_site_builds_strictly_without_broken_links_or_missing_pages(tmp_path):
    """`mkdocs build --strict` fails on a link to a missing page or anchor, a nav entry without its
    file, a docs page left out of the nav, and a missing snippet (bench/README.md)."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, (
        f"mkdocs build --strict failed (install the docs tools with: pip install -e '.[docs]'):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    assert (tmp_path / "site" / "config-reference" / "index.html").is_file()
    assert "Demo runs" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()  # the snippet came in


def test_the_configuration_reference_is_generated_from_the_models():
    gen = generator()
    assert gen.PAGE.read_text() == gen.render(), (
        f"docs/config-reference.md is stale (a config key was added, removed or re-documented): "
        f"run {gen.REGENERATE} and commit the page")


def test_every_config_key_has_a_docstring():
    from rl.run.config import TrainConfig

    missing = generator().undocumented_keys(TrainConfig)
    assert missing == [], f"config keys without a field docstring (the reference shows it): {missing}"


def models_of(annotation) -> list[type[BaseModel]]:
    """Every pydantic model inside an annotation (Optional, list, Annotated, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in models_of(argument)]


def config_keys(model: type[BaseModel], prefix: str = "") -> set[tuple[str, str]]:
    """(dotted parent, key) for every key of a config, found by walking the models on their own."""
    keys = set()
    for name, info in model.model_fields.items():
        keys.add((prefix, name))
        for sub in models_of(info.annotation):
            keys |= config_keys(sub, f"{prefix}.{name}".lstrip("."))
    return keys


def reference_tables(text: str) -> dict[str, set[str]]:
    """Dotted path -> the keys of its table, from the page's headings (`a.b`, `c.d` ...) and rows."""
    tables, paths = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            paths = [path.replace("[]", "") for path in re.findall(r"`([^`]+)`", line.split("{#")[0])]
            if line.startswith("## Top level"):
                paths = [""]
            for path in paths:
                tables.setdefault(path, set())
        elif line.startswith("| `") and paths:
            key = line.split("`")[1]
            for path in paths:
                tables[path].add(key)
    return tables


def test_every_config_key_is_in_the_reference():
    """Checked against the pydantic models directly, not through the generator: every key of
    TrainConfig and of every section it composes has a row under a heading naming its path."""
    from rl.run.config import TrainConfig

    tables = reference_tables((REPO / "docs" / "config-reference.md").read_text())
    missing = sorted(f"{parent}.{key}".lstrip(".") for parent, key in config_keys(TrainConfig)
                     if key not in tables.get(parent, set()))
    assert missing == [], f"config keys missing from docs/config-reference.md: {missing}"
    assert {"rewards.server.python_scorers", "guard.rules.window", "learner.lora.rank"} <= {
        f"{parent}.{key}".lstrip(".") for parent, key in config_keys(TrainConfig)}  # the walk reaches deep keys


def test_the_readme_is_one_page_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (REPO / "README.md", REPO / "bench" / "README.md", REPO / "deploy" / "README.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_no_page_names_an_issue_number():
    """A reader cannot look an issue up: the docs say what and why instead."""
    for page in PAGES:
        found = re.findall(r"\bissues? #?\d+|\(#\d+\)", page.read_text(), flags=re.IGNORECASE)
        assert found == [], f"{page.relative_to(REPO)} names issue numbers: {found}"
