"""The probe app (see pyproject.toml): the ServerApp sends one query to every node; the ClientApp writes
`<state-dir>/ran-<run id>-<label>` on the node (state-dir: the node config key fer-client sets) and replies."""

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + float(context.run_config["wait-for-nodes"])
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    query = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="query")
             for node in nodes]
    list(grid.send_and_receive(query, timeout=60))


@client.query()
def answer(msg: Message, context: Context) -> Message:
    label = str(context.run_config["label"])
    Path(str(context.node_config["state-dir"]), f"ran-{context.run_id}-{label}").write_text("ran")
    return Message(RecordDict({"r": ConfigRecord({"ok": 1})}), reply_to=msg)
