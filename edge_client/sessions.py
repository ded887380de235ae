"""A device host's secure-aggregation sessions: one SecAggDevice (edge_client.secagg) per device for the secure
round under way, holding its keys and self-mask seed, which never leave it. The gRPC runtime and the simulator's
runners hand it the key-phase prompts FetchTask carries and send what it answers."""
from __future__ import annotations

from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import serde
from edgelora.secagg import messages as sa
from edgelora.tasks import Task

from .secagg import ProtocolViolation, SecAggDevice


class SecureSessions:
    def __init__(self) -> None:
        self._sessions: dict[str, SecAggDevice] = {}

    def answer(self, device_id: str, header: pb.TaskHeader):
        """The request answering a SECAGG prompt: AdvertiseKeysRequest, ShareKeysRequest or UnmaskSharesRequest
        (ProtocolViolation when the coordinator asks what an honest device refuses, or sends a malformed prompt)."""
        try:
            prompt = serde.prompt_from_proto(header)
        except ValueError as e:  # no phase, or a setup that does not validate (SecAggError is a ValueError)
            raise ProtocolViolation(f"a malformed secure-aggregation prompt for round {header.round}: {e}") from None
        if isinstance(prompt, sa.Setup):  # a new round: fresh keys, the last round's session is dropped
            if prompt.round != header.round:
                raise ProtocolViolation(f"a setup for round {prompt.round} in a prompt for round {header.round}")
            session = self._sessions[device_id] = SecAggDevice(device_id, prompt)
            return serde.advertise_to_proto(header.round, session.advertise())
        session = self.session(device_id, header.round)
        if isinstance(prompt, sa.PeerKeys):
            return serde.share_to_proto(header.round, session.share(prompt))
        return serde.unmask_to_proto(header.round, session.unmask(prompt))

    def answer_bytes(self, device_id: str, prompt: bytes) -> bytes:
        """answer() from and to bytes, as the simulator's runners carry them."""
        return self.answer(device_id, pb.TaskHeader.FromString(prompt)).SerializeToString()

    def session(self, device_id: str, round_id: int) -> SecAggDevice:
        session = self._sessions.get(device_id)
        if session is None or session.setup.round != round_id:
            raise ProtocolViolation(f"device {device_id} holds no secure-aggregation keys for round {round_id}")
        return session

    def for_task(self, device_id: str, task: Task) -> SecAggDevice | None:
        """The session a secure task's upload is masked with (None: the task is not secure)."""
        return self.session(device_id, task.round) if task.upload.secure is not None else None
