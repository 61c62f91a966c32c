"""The README and docs: every relative link resolves, the README stays short, and no committed text quotes a path of
the machine that ran it (issues K and L)."""
import glob
import os
import re

from conftest import ROOT

TEXTS = ["README.md", "results/README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT))


def test_relative_links_resolve():
    for name in TEXTS:
        text = open(os.path.join(ROOT, name)).read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), target))
                assert os.path.exists(path), f"{name}: dead link {target}"


def test_the_readme_stays_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 16_000


def test_no_machine_paths_in_committed_text():
    texts = TEXTS + sorted(glob.glob("results/**/*.md", root_dir=ROOT, recursive=True))
    for name in texts:
        found = re.findall(r"(?<![\w.~])/(?:work|root|home|tmp|Users)/[\w./-]*", open(os.path.join(ROOT, name)).read())
        assert not found, f"{name}: {found[:3]}"
