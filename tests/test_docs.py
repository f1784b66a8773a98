"""The README and the docs: every relative link points at a file of the repository; the README stays a front
door (at most 15 KB, no issue numbers); every script's module docstring is at most 40 lines."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO_ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = [target for target, _ in LINK.findall(page.read_text())
              if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists()]
    assert not broken, f"{page.name}: broken links {broken}"


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md) [web](https://example.org/x.md)")
    assert [t for t, _ in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://", t)
            and not (page.parent / t).exists()] == ["missing.md"]


def test_readme_is_a_front_door():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15 * 1024
    assert not re.search(r"#\d+(\.\d+)?\b", text), "issue numbers in the README"


@pytest.mark.parametrize("script", ["ppo_baseline.py", "recurrent_ppo_baseline.py", "trace_ppo.py",
                                    "adamemento_ppo.py", "transformer_ppo_baseline.py", "memory_envs.py",
                                    "run_contract.py"])
def test_module_docstrings_are_short(script):
    doc = ast.get_docstring(ast.parse((REPO_ROOT / script).read_text()), clean=False)
    assert doc and len(doc.splitlines()) <= 40
