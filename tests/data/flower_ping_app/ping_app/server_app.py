"""Server side of the ping app: wait for the nodes, query each once, print one JSON line."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query every connected SuperNode once and print ``PING-RESULT {json}``."""
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["wait-seconds"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < int(cfg["min-nodes"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} nodes connected, {cfg['min-nodes']} needed")
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    content = RecordDict({"ping": ConfigRecord({"value": int(cfg["ping-value"])})})
    messages = [
        Message(content, dst_node_id=node_id, message_type=MessageType.QUERY, group_id="ping")
        for node_id in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=float(cfg["reply-timeout"]))
    answers = {}
    for reply in replies:
        if reply.has_error():
            answers[str(reply.metadata.src_node_id)] = {"error": str(reply.error.reason)}
        else:
            answers[str(reply.metadata.src_node_id)] = dict(reply.content["pong"])
    print("PING-RESULT " + json.dumps({"nodes": len(node_ids), "answers": answers}), flush=True)
