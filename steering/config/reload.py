"""What a reload may change (the policies) and what it did: the config's digest, the change
between two configs, and the refusal of a change only a restart can make."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from steering.config.checks import check_policies_on_runner
from steering.config.schema import Deployment, PolicyConfig
from steering.errors import RestartRequired


def digest(deployment: Deployment) -> str:
    """A short fingerprint of what a deployment serves (calibrations included, key order not)."""
    canonical = json.dumps(deployment.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyChanges:
    """What a reload changed: policies added, removed, and changed (with the fields that changed)."""

    previous_digest: str
    digest: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: dict[str, tuple[str, ...]]

    @classmethod
    def between(cls, old: Deployment, new: Deployment) -> PolicyChanges:
        before, after = old.policies, new.policies
        changed = {}
        for name in before.keys() & after.keys():
            fields = tuple(f for f in PolicyConfig.model_fields if getattr(before[name], f) != getattr(after[name], f))
            if fields:
                changed[name] = fields
        return cls(digest(old), digest(new), tuple(n for n in after if n not in before),
                   tuple(n for n in before if n not in after), dict(sorted(changed.items())))

    @classmethod
    def of_reload(cls, running: Deployment, new: Deployment, *, logprobs_at_temperature_one: bool) -> PolicyChanges:
        """What serving `new` instead of `running` changes; `RestartRequired` for a change to
        anything but the policies, `ConfigError` for policies the engine's runner cannot serve."""
        check_reloadable(running, new)
        changes = cls.between(running, new)
        check_policies_on_runner(new, logprobs_at_temperature_one=logprobs_at_temperature_one)
        return changes

    @classmethod
    def from_report(cls, report: dict) -> PolicyChanges:
        """The changes a server reported (`POST /v1/admin/reload`'s answer)."""
        return cls(report["previous_digest"], report["digest"], tuple(report["added"]), tuple(report["removed"]),
                   {name: tuple(fields) for name, fields in report["changed"].items()})

    @property
    def unchanged(self) -> bool:
        return self.digest == self.previous_digest

    def report(self) -> dict:
        """The changes as `POST /v1/admin/reload` answers them."""
        return {"status": "unchanged" if self.unchanged else "reloaded", "digest": self.digest,
                "previous_digest": self.previous_digest, "added": list(self.added), "removed": list(self.removed),
                "changed": {name: list(fields) for name, fields in self.changed.items()}}

    def describe(self, *, one_line: bool = True) -> str:
        """What changed: in one line, as the server logs it, or a line a change for a terminal."""
        if one_line:
            if self.unchanged:
                return f"config {self.digest} unchanged"
            parts = [f"config {self.previous_digest} -> {self.digest}"]
            parts += [f"added {list(self.added)}"] * bool(self.added)
            parts += [f"removed {list(self.removed)}"] * bool(self.removed)
            parts += [f"changed {name} ({', '.join(fields)})" for name, fields in self.changed.items()]
            return "; ".join(parts)
        if self.unchanged:
            return f"unchanged: the server already serves config {self.digest}"
        lines = [f"reloaded: config {self.previous_digest} -> {self.digest}"]
        lines += [f"  added {name}" for name in self.added]
        lines += [f"  removed {name}" for name in self.removed]
        lines += [f"  changed {name}: {', '.join(fields)}" for name, fields in self.changed.items()]
        return "\n".join(lines)


def check_reloadable(running: Deployment, new: Deployment) -> None:
    """Only policies change without a restart: the base, the experts and the engine are loaded into
    vLLM's engine, the tool parser is checked against its tokenizer. Raises `RestartRequired`
    naming the first field that differs."""
    before = running.model_dump(mode="json", exclude={"policies"})
    after = new.model_dump(mode="json", exclude={"policies"})
    field = _first_difference(before, after, "")
    if field is not None:
        section = field.split(".")[0]
        raise RestartRequired(field, f"the running engine has {_shown(before, field)}, the file now has "
                                     f"{_shown(after, field)}; `{section}` takes effect only when the server "
                                     "restarts (a reload changes policies only)")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if a == b else path


def _shown(tree: dict, field: str) -> str:
    for key in field.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return "none" if tree is None else repr(tree)
