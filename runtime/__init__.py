"""What runs threads: the actor system, agents, middleware, models and tools."""

from threadline.actors._actor import StreamPart as StreamPart
from threadline.actors._actor import ThreadSnapshot as ThreadSnapshot
from threadline.actors._actor import TurnResult as TurnResult
from threadline.actors._records import StepInfo as StepInfo

from ._agent import Agent as Agent
from ._context import ModelRequest as ModelRequest
from ._context import Runtime as Runtime
from ._context import ToolCallRequest as ToolCallRequest
from ._context import ToolRuntime as ToolRuntime
from ._middleware import AgentMiddleware as AgentMiddleware
from ._middleware import after_agent as after_agent
from ._middleware import after_model as after_model
from ._middleware import before_agent as before_agent
from ._middleware import before_model as before_model
from ._middleware import dynamic_prompt as dynamic_prompt
from ._middleware import wrap_model_call as wrap_model_call
from ._middleware import wrap_tool_call as wrap_tool_call
from ._models import ChatModel as ChatModel
from ._models import ScriptedModel as ScriptedModel
from ._models import demo_model as demo_model
from ._system import ActorSystem as ActorSystem
from ._system import open_snapshot_store as open_snapshot_store
from ._tools import Tool as Tool
from ._tools import tool as tool

__all__ = (
    "ActorSystem",
    "Agent",
    "AgentMiddleware",
    "ChatModel",
    "ModelRequest",
    "Runtime",
    "ScriptedModel",
    "StepInfo",
    "StreamPart",
    "ThreadSnapshot",
    "Tool",
    "ToolCallRequest",
    "ToolRuntime",
    "TurnResult",
    "after_agent",
    "after_model",
    "before_agent",
    "before_model",
    "demo_model",
    "dynamic_prompt",
    "open_snapshot_store",
    "tool",
    "wrap_model_call",
    "wrap_tool_call",
)
