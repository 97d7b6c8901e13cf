"""The one error type a stage raises for bad input: it becomes one clear line and a non-zero exit."""

from __future__ import annotations


class PipelineError(Exception):
    """What went wrong, where, and how to fix it, in one line."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " -- ".join(parts)


class ConfigError(PipelineError):
    pass


class ContractError(PipelineError):
    pass
