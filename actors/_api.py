"""The internal face of ``threadline.actors`` for threadline's own packages.

``threadline.runtime`` and ``threadline.persistence`` import the actor
machinery (records, the actor, reducer internals) from here and from the
package face, never from another private module: what is listed here is what
the other packages may build on, and a test keeps it that way. Users import
from ``threadline`` or ``threadline.actors``.
"""

from ._actor import Acknowledge as Acknowledge
from ._actor import ActorContext as ActorContext
from ._actor import Behavior as Behavior
from ._actor import Emit as Emit
from ._actor import StepOutcome as StepOutcome
from ._actor import StreamPart as StreamPart
from ._actor import ThreadActor as ThreadActor
from ._actor import ThreadSnapshot as ThreadSnapshot
from ._actor import TurnResult as TurnResult
from ._actor import stream_modes as stream_modes
from ._envelope import Envelope as Envelope
from ._envelope import Reply as Reply
from ._errors import limits_text as limits_text
from ._logging import get_logger as get_logger
from ._mailbox import MailboxStatistics as MailboxStatistics
from ._messages import check_message as check_message
from ._messages import new_id as new_id
from ._messages import pending_tool_calls as pending_tool_calls
from ._nesting import MAX_NESTING as MAX_NESTING
from ._nesting import too_deep as too_deep
from ._records import FullRecord as FullRecord
from ._records import Recovered as Recovered
from ._records import StepInfo as StepInfo
from ._records import StepRecord as StepRecord
from ._records import TurnCursor as TurnCursor
from ._state import initial_state as initial_state
from ._state import merge_updates as merge_updates
from ._state import schema_info as schema_info

__all__ = (
    "ActorContext",
    "Acknowledge",
    "Behavior",
    "Emit",
    "MAX_NESTING",
    "Envelope",
    "FullRecord",
    "MailboxStatistics",
    "Recovered",
    "Reply",
    "StepInfo",
    "StepOutcome",
    "StepRecord",
    "StreamPart",
    "ThreadActor",
    "ThreadSnapshot",
    "TurnCursor",
    "TurnResult",
    "check_message",
    "get_logger",
    "initial_state",
    "limits_text",
    "merge_updates",
    "new_id",
    "pending_tool_calls",
    "schema_info",
    "stream_modes",
    "too_deep",
)
