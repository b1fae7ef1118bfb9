"""What runs threads: the actor system, agents, middleware, models and tools."""

from threadline.actors._actor import StreamPart as StreamPart
from threadline.actors._actor import ThreadSnapshot as ThreadSnapshot
from threadline.actors._actor import TurnResult as TurnResult
from threadline.actors._records import StepInfo as StepInfo

from ._agent import Agent as Agent
from ._builtin import DEFAULT_SUMMARY_PROMPT as DEFAULT_SUMMARY_PROMPT
from ._builtin import CallLimitState as CallLimitState
from ._builtin import ContextEditingMiddleware as ContextEditingMiddleware
from ._builtin import ModelCallLimitExceededError as ModelCallLimitExceededError
from ._builtin import ModelCallLimitMiddleware as ModelCallLimitMiddleware
from ._builtin import ModelFallbackMiddleware as ModelFallbackMiddleware
from ._builtin import ModelRetryMiddleware as ModelRetryMiddleware
from ._builtin import SummarizationMiddleware as SummarizationMiddleware
from ._builtin import ToolCallLimitExceededError as ToolCallLimitExceededError
from ._builtin import ToolCallLimitMiddleware as ToolCallLimitMiddleware
from ._builtin import ToolRetryMiddleware as ToolRetryMiddleware
from ._context import ModelRequest as ModelRequest
from ._context import Runtime as Runtime
from ._context import ToolCallRequest as ToolCallRequest
from ._context import ToolRuntime as ToolRuntime
from ._langchain import LangChainChatModel as LangChainChatModel
from ._langchain import from_langchain as from_langchain
from ._langchain import to_langchain as to_langchain
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
from ._openai import MessageChunk as MessageChunk
from ._openai import ModelConnectionError as ModelConnectionError
from ._openai import ModelError as ModelError
from ._openai import ModelHTTPError as ModelHTTPError
from ._openai import ModelResponseError as ModelResponseError
from ._openai import ModelTimeoutError as ModelTimeoutError
from ._openai import OpenAIChatModel as OpenAIChatModel
from ._system import ActorSystem as ActorSystem
from ._system import open_snapshot_store as open_snapshot_store
from ._tools import Tool as Tool
from ._tools import tool as tool
from ._trim import TokenCounter as TokenCounter
from ._trim import count_tokens_approximately as count_tokens_approximately
from ._trim import remove_messages as remove_messages
from ._trim import safe_cut as safe_cut
from ._trim import trim_messages as trim_messages

__all__ = (
    "ActorSystem",
    "Agent",
    "AgentMiddleware",
    "CallLimitState",
    "ChatModel",
    "ContextEditingMiddleware",
    "DEFAULT_SUMMARY_PROMPT",
    "LangChainChatModel",
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
    "ThreadSnapshot",
    "TokenCounter",
    "Tool",
    "ToolCallLimitExceededError",
    "ToolCallLimitMiddleware",
    "ToolCallRequest",
    "ToolRetryMiddleware",
    "ToolRuntime",
    "TurnResult",
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
