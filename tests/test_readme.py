"""The README's map of the code names every module of the package, and nothing that is gone."""

import re

from conftest import ROOT


def test_the_map_of_the_code_names_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    bullets = section.split("\n- ")
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pretrain").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))

    def named(module: str) -> bool:
        folder, name = module.rsplit("/", 1)
        return f"`{module}`" in section or any(
            bullet.startswith(f"`{folder}/`") and f"`{name}`" in bullet for bullet in bullets)

    assert [module for module in modules if not named(module)] == []
    mentioned = set(re.findall(r"`(pretrain/[\w/]+\.py)`", section))
    assert mentioned <= set(modules), mentioned - set(modules)
