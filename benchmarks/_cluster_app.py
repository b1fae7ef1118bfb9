"""The agent the cluster benchmark's worker processes serve (``--app
benchmarks._cluster_app:agent``) and its in-process peer runs: a
``ScriptedModel`` that answers at once with the 200-character reply."""

from __future__ import annotations

from typing import Any

from threadline.runtime import Agent, ScriptedModel

from ._common import REPLY


def agent() -> Agent[Any]:
    """A new agent (its own model) per process or system."""
    return Agent(model=ScriptedModel([REPLY]))
