"""The README starts in one screen and every page it moved to is reachable: each relative link of the README and of
docs/ names a file of the checkout."""
import re

from conftest import ROOT

LINK = re.compile(r'\]\(([^)#\s]+)(?:#[^)]*)?\)')


def test_the_readme_is_short_and_every_relative_link_resolves():
    assert (ROOT / 'README.md').stat().st_size <= 16_000
    pages = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
    linked = set()
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if '://' in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f'{page.relative_to(ROOT)} links to {target}, which does not exist'
            linked.add(path)
    assert {p.resolve() for p in pages[1:]} <= linked  # every page of docs/ is linked from somewhere


def test_every_test_that_the_troubleshooting_page_names_exists():
    """Each failure the page lists names the test that delivers it: those tests must exist."""
    text = (ROOT / 'docs' / 'troubleshooting.md').read_text()
    named = set(re.findall(r'`(test_\w+\.py)::(test_\w+)`', text))
    assert len(named) > 40
    missing = [f'{module}::{name}' for module, name in sorted(named)
               if not re.search(rf'^def {name}\(', (ROOT / 'tests' / module).read_text(), re.M)]
    assert not missing, missing
