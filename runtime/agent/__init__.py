"""The agent loop: requests, tools, middleware (base, decorators, built-ins) and trimming."""

from ._agent import Agent as Agent
from ._agent import BoundAgent as BoundAgent
from ._middleware import AgentMiddleware as AgentMiddleware
from ._middleware import after_agent as after_agent
from ._middleware import after_model as after_model
from ._middleware import before_agent as before_agent
from ._middleware import before_model as before_model
from ._middleware import dynamic_prompt as dynamic_prompt
from ._middleware import wrap_model_call as wrap_model_call
from ._middleware import wrap_tool_call as wrap_tool_call
from ._requests import ModelRequest as ModelRequest
from ._requests import Runtime as Runtime
from ._requests import ToolCallRequest as ToolCallRequest
from ._requests import ToolRuntime as ToolRuntime
from ._requests import interrupt as interrupt
from ._tools import Tool as Tool
from ._tools import tool as tool
from ._trim import TokenCounter as TokenCounter
from ._trim import count_tokens_approximately as count_tokens_approximately
from ._trim import remove_messages as remove_messages
from ._trim import safe_cut as safe_cut
from ._trim import trim_messages as trim_messages

__all__ = (
    "Agent",
    "AgentMiddleware",
    "BoundAgent",
    "ModelRequest",
    "Runtime",
    "TokenCounter",
    "Tool",
    "ToolCallRequest",
    "ToolRuntime",
    "after_agent",
    "after_model",
    "before_agent",
    "before_model",
    "count_tokens_approximately",
    "dynamic_prompt",
    "interrupt",
    "remove_messages",
    "safe_cut",
    "tool",
    "trim_messages",
    "wrap_model_call",
    "wrap_tool_call",
)
