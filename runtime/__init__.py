"""What runs threads: the actor system, agents, middleware, models and tools."""

from threadline.actors import InvalidToolError as InvalidToolError
from threadline.actors import ModelCallLimitExceededError as ModelCallLimitExceededError
from threadline.actors import ModelConnectionError as ModelConnectionError
from threadline.actors import ModelError as ModelError
from threadline.actors import ModelHTTPError as ModelHTTPError
from threadline.actors import ModelResponseError as ModelResponseError
from threadline.actors import ModelTimeoutError as ModelTimeoutError
from threadline.actors import ToolCallLimitExceededError as ToolCallLimitExceededError
from threadline.actors._api import StepInfo as StepInfo
from threadline.actors._api import StreamPart as StreamPart
from threadline.actors._api import ThreadSnapshot as ThreadSnapshot
from threadline.actors._api import TurnResult as TurnResult
from threadline.persistence import open_snapshot_store as open_snapshot_store

from ._client import LocalClient as LocalClient
from ._client import ThreadClient as ThreadClient
from ._door import Input as Input
from ._remote import Client as Client
from ._system import ActorSystem as ActorSystem
from ._worker import Worker as Worker
from .agent import Agent as Agent
from .agent import AgentMiddleware as AgentMiddleware
from .agent import ModelRequest as ModelRequest
from .agent import Runtime as Runtime
from .agent import TokenCounter as TokenCounter
from .agent import Tool as Tool
from .agent import ToolCallRequest as ToolCallRequest
from .agent import ToolRuntime as ToolRuntime
from .agent import after_agent as after_agent
from .agent import after_model as after_model
from .agent import before_agent as before_agent
from .agent import before_model as before_model
from .agent import count_tokens_approximately as count_tokens_approximately
from .agent import dynamic_prompt as dynamic_prompt
from .agent import remove_messages as remove_messages
from .agent import safe_cut as safe_cut
from .agent import tool as tool
from .agent import trim_messages as trim_messages
from .agent import wrap_model_call as wrap_model_call
from .agent import wrap_tool_call as wrap_tool_call
from .agent.middleware import DEFAULT_SUMMARY_PROMPT as DEFAULT_SUMMARY_PROMPT
from .agent.middleware import CallLimitState as CallLimitState
from .agent.middleware import ContextEditingMiddleware as ContextEditingMiddleware
from .agent.middleware import ModelCallLimitMiddleware as ModelCallLimitMiddleware
from .agent.middleware import ModelFallbackMiddleware as ModelFallbackMiddleware
from .agent.middleware import ModelRetryMiddleware as ModelRetryMiddleware
from .agent.middleware import SummarizationMiddleware as SummarizationMiddleware
from .agent.middleware import ToolCallLimitMiddleware as ToolCallLimitMiddleware
from .agent.middleware import ToolRetryMiddleware as ToolRetryMiddleware
from .models import ChatModel as ChatModel
from .models import LangChainChatModel as LangChainChatModel
from .models import MessageChunk as MessageChunk
from .models import OpenAIChatModel as OpenAIChatModel
from .models import ScriptedModel as ScriptedModel
from .models import demo_model as demo_model
from .models import from_langchain as from_langchain
from .models import to_langchain as to_langchain

__all__ = (
    "ActorSystem",
    "Agent",
    "AgentMiddleware",
    "CallLimitState",
    "ChatModel",
    "Client",
    "ContextEditingMiddleware",
    "DEFAULT_SUMMARY_PROMPT",
    "Input",
    "InvalidToolError",
    "LangChainChatModel",
    "LocalClient",
    "MessageChunk",
    "ModelCallLimitExceededError",
    "ModelCallLimitMiddleware",
    "ModelConnectionError",
    "ModelError",
    "ModelFallbackMiddleware",
    "ModelHTTPError",
    "ModelRequest",
    "ModelResponseError",
    "ModelRetryMiddleware",
    "ModelTimeoutError",
    "OpenAIChatModel",
    "Runtime",
    "ScriptedModel",
    "StepInfo",
    "StreamPart",
    "SummarizationMiddleware",
    "ThreadClient",
    "ThreadSnapshot",
    "TokenCounter",
    "Tool",
    "ToolCallLimitExceededError",
    "ToolCallLimitMiddleware",
    "ToolCallRequest",
    "ToolRetryMiddleware",
    "ToolRuntime",
    "TurnResult",
    "Worker",
    "after_agent",
    "after_model",
    "before_agent",
    "before_model",
    "count_tokens_approximately",
    "demo_model",
    "dynamic_prompt",
    "from_langchain",
    "open_snapshot_store",
    "remove_messages",
    "safe_cut",
    "to_langchain",
    "tool",
    "trim_messages",
    "wrap_model_call",
    "wrap_tool_call",
)
