"""A client process for the scale-out tests (``python -m tests._scaleout_client``).

    python -m tests._scaleout_client URL PREFIX HISTORY THREAD N

Sends messages 0..N-1 to THREAD through a ``Client``, as sender
``c-THREAD``: even ones told, odd ones asked. Every operation is appended to
the history file HISTORY. Prints ``told <id>`` once a tell returned (the
message is durable) and ``asking <id>`` just before an ask, so the test can
SIGKILL it right there. Prints ``done`` at the end.
"""

from __future__ import annotations

import sys

import anyio

from threadline.runtime import Client

from ._history import History
from ._scaleout_worker import message_text


async def main(url: str, prefix: str, path: str, thread: str, n: int) -> None:
    sender = f"c-{thread}"
    with History(path) as history:
        async with Client(url, prefix=prefix) as client:
            for i in range(n):
                mid = f"{thread}-m{i}"
                if i % 2 == 0:
                    history.record("send", sender, thread, mid, how="tell")
                    await client.tell(thread, message_text(i), message_id=mid)
                    history.record("ack", sender, thread, mid, how="tell")
                    print(f"told {mid}", flush=True)
                else:
                    history.record("send", sender, thread, mid)
                    print(f"asking {mid}", flush=True)
                    result = await client.ask(thread, message_text(i), message_id=mid)
                    history.record(
                        "reply",
                        sender,
                        thread,
                        mid,
                        version=result.version,
                        duplicate=result.duplicate,
                    )
    print("done", flush=True)


if __name__ == "__main__":
    url, prefix, path, thread, n = sys.argv[1:6]
    anyio.run(main, url, prefix, path, thread, int(n))
