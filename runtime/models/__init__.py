"""Chat models: the ``ChatModel`` protocol, scripted and demo models, an
OpenAI-compatible HTTP model and the LangChain adapter."""

from ._base import ChatModel as ChatModel
from ._base import MessageChunk as MessageChunk
from ._demo import demo_model as demo_model
from ._demo import word_count as word_count
from ._langchain import LangChainChatModel as LangChainChatModel
from ._langchain import from_langchain as from_langchain
from ._langchain import to_langchain as to_langchain
from ._openai import DEFAULT_BASE_URL as DEFAULT_BASE_URL
from ._openai import OpenAIChatModel as OpenAIChatModel
from ._scripted import ScriptedModel as ScriptedModel

__all__ = (
    "ChatModel",
    "DEFAULT_BASE_URL",
    "LangChainChatModel",
    "MessageChunk",
    "OpenAIChatModel",
    "ScriptedModel",
    "demo_model",
    "from_langchain",
    "to_langchain",
    "word_count",
)
