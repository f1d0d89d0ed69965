"""infra/Dockerfile cannot be built here (no Docker engine); check what it relies on exists."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_every_copied_path_exists_and_nothing_ignored_is_needed():
    text = (REPO / "infra" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE)
    assert copies
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for line in copies:
        for source in line.split():
            assert (REPO / source).exists(), f"infra/Dockerfile copies {source}, which is not in the repository"
            assert source.rstrip("/") not in ignored


def test_installs_from_the_lock_and_runs_unprivileged():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "--constraint constraints.txt" in text
    assert re.search(r"^USER (?!root)\w+", text, flags=re.MULTILINE)
