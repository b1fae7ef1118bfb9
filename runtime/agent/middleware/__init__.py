"""The built-in middleware, one module each, after LangChain's of the same names."""

from ._call_limits import CallLimitState as CallLimitState
from ._call_limits import ModelCallLimitMiddleware as ModelCallLimitMiddleware
from ._call_limits import ToolCallLimitMiddleware as ToolCallLimitMiddleware
from ._context_editing import ContextEditingMiddleware as ContextEditingMiddleware
from ._fallback import ModelFallbackMiddleware as ModelFallbackMiddleware
from ._human import HumanInTheLoopMiddleware as HumanInTheLoopMiddleware
from ._retry import ModelRetryMiddleware as ModelRetryMiddleware
from ._retry import ToolRetryMiddleware as ToolRetryMiddleware
from ._summarization import DEFAULT_SUMMARY_PROMPT as DEFAULT_SUMMARY_PROMPT
from ._summarization import SummarizationMiddleware as SummarizationMiddleware

__all__ = (
    "CallLimitState",
    "ContextEditingMiddleware",
    "DEFAULT_SUMMARY_PROMPT",
    "HumanInTheLoopMiddleware",
    "ModelCallLimitMiddleware",
    "ModelFallbackMiddleware",
    "ModelRetryMiddleware",
    "SummarizationMiddleware",
    "ToolCallLimitMiddleware",
    "ToolRetryMiddleware",
)
