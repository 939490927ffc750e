"""Runs a real ServerApp against real ClientApps in one process, through Flower's own link state and grid.

Why not `flwr.simulation.run_simulation`: in Flower 1.41 it works, but only on the Ray backend, which costs about
12 s of start-up per call on two cores. This runtime keeps everything of that path except Ray: Flower's
`InMemoryLinkState` (message IDs, reply checks, TTLs), `InMemoryGrid` (woken by events rather than polling), node
registration and contexts, and every message crosses a protobuf "wire" (`message_to_proto` -> bytes ->
`message_from_proto`) in both directions, as it would between a SuperLink and a SuperNode. A ClientApp exception
becomes an error reply, as on Flower's runtimes.
"""

from __future__ import annotations

import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.serverapp import Grid
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid


# Longest sleep of an idle wait: a safety net only, every wait is normally ended by an event.
_WAKE_UP = 0.5


@dataclass
class InProcessRun:
    """What a run left behind.

    Attributes:
        replies: Every reply as the server received it, in arrival order (what a curious server gets to see).
        node_contexts: Each node's Context after the run, by node ID (the state a mod kept between messages).
    """

    replies: list[Message] = field(default_factory=list)
    node_contexts: dict[int, Context] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def over_the_wire(message: Message) -> Message:
    """The message a receiver reconstructs from its protobuf bytes (a deep copy, as across a network)."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))


class _EventGrid(InMemoryGrid):
    """Flower's InMemoryGrid, woken by events instead of sleeping between polls.

    Polling every few milliseconds costs latency per protocol stage and CPU that grows with the round's length;
    SecAgg+ has four stages to plain FedAvg's one, so polling would bias the comparison the benchmark makes.
    """

    def __init__(self, *, state_factory: LinkStateFactory, pushed: threading.Event, replied: threading.Condition):
        super().__init__(state_factory=state_factory)
        self._pushed = pushed
        self._replied = replied

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = list(super().push_messages(messages))
        self._pushed.set()
        return message_ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Same contract as InMemoryGrid.send_and_receive (flwr 1.41): every reply, or those in by the timeout.
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        received: list[Message] = []
        with self._replied:
            while pending:
                replies = list(self.pull_messages(pending))
                received.extend(replies)
                pending.difference_update(reply.metadata.reply_to_message_id for reply in replies)
                remaining = None if deadline is None else deadline - time.monotonic()
                if not pending or (remaining is not None and remaining <= 0):
                    break
                self._replied.wait(timeout=_WAKE_UP if remaining is None else min(remaining, _WAKE_UP))
        return received


def run_in_process(
    server_main: Callable[[Grid, Context], None],
    client_app: ClientApp,
    *,
    num_nodes: int,
    client_threads: int = 2,
    node_config: Callable[[int], dict] | None = None,
) -> InProcessRun:
    """Runs `server_main(grid, context)` to completion while `num_nodes` SuperNodes run `client_app`.

    Args:
        server_main: The ServerApp's main function (e.g. the body of an `@app.main()`).
        client_app: The ClientApp every node runs, mods included.
        num_nodes: Number of nodes; node i gets node config partition-id = i.
        client_threads: ClientApp calls processed concurrently.
        node_config: Extra node-config entries of the node with a given partition ID (e.g. its keys, a roster).

    Returns:
        The replies the server received and the nodes' final contexts.
    """
    state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    link_state = state_factory.state()
    assert isinstance(link_state, InMemoryLinkState)
    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    link_state.run_ids[run.run_id] = RunRecord(run=run)
    link_state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = _register_nodes(num_nodes=num_nodes, state_factory=state_factory)
    contexts = {
        node_id: Context(
            run_id=run.run_id,
            node_id=node_id,
            node_config={
                PARTITION_ID_KEY: partition,
                NUM_PARTITIONS_KEY: num_nodes,
                **(node_config(partition) if node_config else {}),
            },
            state=RecordDict(),
            run_config={},
        )
        for node_id, partition in nodes.items()
    }
    pushed, replied, stop = threading.Event(), threading.Condition(), threading.Event()
    grid = _EventGrid(state_factory=state_factory, pushed=pushed, replied=replied)
    grid.set_run(run)
    outcome = InProcessRun(node_contexts=contexts)

    def handle(message: Message) -> None:
        received = over_the_wire(message)
        try:
            reply = client_app(message=received, context=contexts[received.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - every ClientApp failure becomes an error reply, as in Flower
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=received)
        reply = over_the_wire(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        with outcome.lock:
            outcome.replies.append(reply)
        with replied:
            link_state.store_message_res(reply)
            replied.notify_all()

    def serve_nodes(executor: ThreadPoolExecutor) -> None:
        while not stop.is_set():
            pushed.wait(timeout=_WAKE_UP)
            pushed.clear()
            for node_id in nodes:
                for message in link_state.get_message_ins(node_id=node_id, limit=None):
                    executor.submit(handle, message)

    server_context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # Messages take their run and sender from this process-wide identity, as `run_simulation` sets it.
    saved_identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    with ThreadPoolExecutor(max_workers=client_threads) as executor:
        node_loop = threading.Thread(target=serve_nodes, args=(executor,), daemon=True)
        node_loop.start()
        try:
            server_main(grid, server_context)
        finally:
            stop.set()
            pushed.set()
            node_loop.join()
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved_identity
    return outcome
