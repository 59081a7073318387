"""An unsigned Flower app: its ClientApp leaves a marker file wherever it runs (test fixture)."""

import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text(f"code ran on node {context.node_id}\n")
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < 2 and time.monotonic() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=90))
    print(f"intruder: {len(replies)} replies, {sum(r.has_error() for r in replies)} errors")
