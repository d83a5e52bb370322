"""The registry: flows and tasks never name a method, and what methods declare holds together."""

import io
import re
import tokenize

import pytest

from subjectflow.methods import registry
from subjectflow.methods.base import Method
from subjectflow.config import Config
from subjectflow.training.subjects import TuningError
from tests.conftest import REPO_ROOT


def _words(path):
    """Every identifier, string and comment of a Python file."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [t.string for t in tokens if t.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT)]


def test_flows_and_tasks_never_name_a_method():
    names = registry.names()
    assert {"sft", "sfo", "jedi", "jedi-sfo", "oneactor"} <= set(names)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])", re.IGNORECASE)
    found = {}
    for path in sorted((REPO_ROOT / "flows").glob("*.py")) + sorted((REPO_ROOT / "tasks").glob("*.py")):
        for word in _words(path):
            for hit in pattern.findall(word):
                found.setdefault(path.relative_to(REPO_ROOT).as_posix(), set()).add(hit)
    assert found == {}, f"orchestration names methods; go through subjectflow.methods.registry: {found}"
    assert pattern.search("tune --method sfo") and not pattern.search("jointsets sft_params")


def test_needs_resolve_in_registration_order_and_must_be_registered_first():
    order = registry.names()
    for name in order:
        assert all(order.index(need) < order.index(name) for need in registry.get(name).needs)
    assert registry.targets(Config(), ["oneactor", "sft"]) == ["sft", "oneactor"]

    class Orphan(Method):
        name, needs = "orphan", ("no-such-method",)

    with pytest.raises(ValueError, match="not registered before it"):
        registry.register(Orphan())

    class SharedOnPerSubject(Method):
        name, shared, needs = "shared-on-sft", True, ("sft",)

    with pytest.raises(ValueError, match="cannot start from a per-subject artefact"):
        registry.register(SharedOnPerSubject())
    assert "orphan" not in registry.names() and "shared-on-sft" not in registry.names()


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(TuningError, match="unknown method 'dreambooth'.*sft, sfo"):
        registry.get("dreambooth")


def test_methods_describes_needs_scope_and_settings():
    text = registry.describe(verbose=True, config=Config())
    assert "sfo" in text and "needs sft" in text and "shared by every subject" in text
    assert "oneactor: {'steps': 200" in text
    # The families each method runs on (the others are refused before a model loads).
    sfo, detex = (text[text.index(f"\n{name} "):].split("\n")[3] for name in ("sfo", "detex"))
    assert " ".join(sfo.split()) == "base models: Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3, FLUX.1"
    assert " ".join(detex.split()) == "base models: Stable Diffusion 1.x/2.x, SDXL"
