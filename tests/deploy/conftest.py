"""What `deploy/` ships: container images and Kubernetes manifests, read as their tools read them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The steering images; Dockerfile.router is vLLM's router, checked on its own.
DOCKERFILES = sorted(path for path in (DEPLOY / "docker").glob("Dockerfile.*") if path.suffix != ".router")
ROUTER_DOCKERFILE = DEPLOY / "docker" / "Dockerfile.router"
KUBERNETES = DEPLOY / "kubernetes"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    @property
    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT (or the words of a shell form)."""
        text = self.arguments
        return yaml.safe_load(text) if text.startswith("[") else shlex.split(text)


def instructions(dockerfile: Path) -> list[Instruction]:
    """A Dockerfile's instructions, continuation lines joined and comments dropped."""
    found, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            found.append(Instruction(keyword.upper(), arguments.strip()))
            pending = ""
    return found


def manifests(folder: Path = KUBERNETES) -> list[tuple[Path, dict]]:
    """Every Kubernetes object under `folder` (kustomizations and Helm values are not objects)."""
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and "kind" in document and document.get("kind") != "Kustomization":
                found.append((path, document))
    return found


def find(kind: str, name: str) -> dict:
    (found,) = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def objects() -> list[tuple[Path, dict]]:
    return manifests()
