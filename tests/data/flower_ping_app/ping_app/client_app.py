"""Client side of the ping app: answer ``ping`` with the SuperNode's node config and ping + 1."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def ping(msg: Message, context: Context) -> Message:
    """Reply with the node config this SuperNode was started with and the ping value + 1."""
    value = int(msg.content["ping"]["value"])
    node_config = {key: str(val) for key, val in context.node_config.items()}
    reply = ConfigRecord({"answer": value + 1, **{f"node.{k}": v for k, v in node_config.items()}})
    return Message(RecordDict({"pong": reply}), reply_to=msg)
