"""TLS, mutual TLS and per-device tokens on a real server process: every impostor is refused, and a good device
still trains in the same run."""
from __future__ import annotations

import subprocess

import grpc
import pytest
import tomli_w

from edgelora.launch import wait_for_server_addr
from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.server.auth import load_tokens

from .conftest import cli, tiny_raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from deploy.make_certs import make_certs

    good = make_certs(tmp_path_factory.mktemp("pki"), devices=2)
    other = make_certs(tmp_path_factory.mktemp("other_pki"), devices=1, ca_name="some other CA")
    return good, other




def _stub(addr, pki, device_pki=None, device="0"):
    dp = device_pki or pki
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (dp / f"device-{device}.key").read_bytes(),
                                         (dp / f"device-{device}.pem").read_bytes())
    channel = grpc.secure_channel(addr, creds)
    return channel, pb_grpc.CoordinatorStub(channel)


def _md(device_id, token):
    return (("x-device-id", device_id), ("authorization", f"Bearer {token}"))


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_impostors_are_refused_and_a_good_device_trains(tmp_path, certs):
    pki, other = certs
    tokens = load_tokens(pki / "tokens.toml")
    raw = tiny_raw(server={"rounds": 1, "devices_per_round": 1, "min_devices": 1, "min_registered": 1})
    (tmp_path / "run.toml").write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "run"
    server = subprocess.Popen(cli("-v", "server", "--config", str(tmp_path / "run.toml"), "--out", str(run_dir),
                                  "--port", "0", "--tls-cert", str(pki / "server.pem"),
                                  "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                                  "--tokens", str(pki / "tokens.toml")),
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    good = None
    try:
        addr = wait_for_server_addr(run_dir, server, 120)
        channel, stub = _stub(addr, pki)
        spec = pb.RunSpecRequest()
        reg = pb.RegisterRequest(device_id="0", hardware="impostor")
        # no token / a wrong token: UNAUTHENTICATED
        assert _code(lambda: stub.GetRunSpec(spec, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: stub.Register(reg, timeout=10, metadata=_md("0", "x" * 43)))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        # device 1's token used as device 0: in the metadata, in the message, in an upload's header
        assert _code(lambda: stub.Register(reg, timeout=10, metadata=_md("0", tokens["1"])))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
        code, details = _code(lambda: stub.Register(reg, timeout=10, metadata=_md("1", tokens["1"])))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "only as device 1" in details
        chunks = iter([pb.UpdateChunk(header=pb.UpdateHeader(device_id="0", round=1, payload_bytes=3)),
                       pb.UpdateChunk(data=b"abc")])
        assert _code(lambda: stub.SubmitUpdate(chunks, timeout=10, metadata=_md("1", tokens["1"])))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
        # the right token for the right id passes the interceptor (the spec is open to any enrolled device)
        got = stub.GetRunSpec(spec, timeout=10, metadata=_md("1", tokens["1"]))
        assert got.run_id == run_dir.name
        assert got.initial_structure.kind == pb.Structure.LORA  # what devices build before they register
        channel.close()
        # a client certificate from another CA never completes the TLS handshake: no RPC reaches the server
        # (gRPC reports a failed handshake as UNAVAILABLE; there is no HTTP/2 stream to carry another status)
        channel, stub = _stub(addr, pki, device_pki=other)
        code, details = _code(lambda: stub.GetRunSpec(spec, timeout=5, metadata=_md("0", tokens["0"])))
        assert code == grpc.StatusCode.UNAVAILABLE, details
        channel.close()

        good = subprocess.Popen(cli("-v", "client", "--server", addr, "--device-id", "0", "--quiet",
                                    "--give-up-s", "30", "--tls-ca", str(pki / "ca.pem"),
                                    "--tls-cert", str(pki / "device-0.pem"), "--tls-key", str(pki / "device-0.key"),
                                    "--token", tokens["0"]),
                                stdout=open(tmp_path / "client.log", "w"), stderr=subprocess.STDOUT)
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert good.wait(timeout=60) == 0, (tmp_path / "client.log").read_text()[-3000:]
    finally:
        for p in (server, good):
            if p is not None and p.poll() is None:
                p.kill()
    import json

    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["aggregated"] and [d["device_id"] for d in rec["devices"]] == ["0"]
    log = (tmp_path / "server.log").read_text()
    assert "token of device 1 used as '0'" in log and "missing device token" in log
    # an id named inside a request that the token does not own: refused and logged too
    assert "request naming device '0' refused: this token may act only as device 1" in log


def test_plaintext_must_be_asked_for_even_on_loopback(tmp_path):
    out = subprocess.run(cli("server", "--host", "127.0.0.1", "--out", str(tmp_path / "r")), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--insecure" in out.stderr
    out = subprocess.run(cli("client", "--server", "127.0.0.1:1", "--device-id", "0"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--insecure" in out.stderr


def test_device_names_bind_to_their_tokens_as_indices_do(tiny_config, tmp_path):
    """data.mode = own: ids are names; a tokens file keyed by names lets 'alpha' register as alpha only
    (a real in-process server behind the token interceptor, plaintext loopback)."""
    from edgelora.server.app import run_server
    from edgelora.server.auth import DeviceTokenInterceptor, make_tokens

    (tmp_path / "tokens.toml").write_text(make_tokens(["alpha", "bravo"]))
    tokens = load_tokens(tmp_path / "tokens.toml")
    run = tiny_config(data={"mode": "own", "label_names": ["a", "b"], "dataset": "csv"})
    with run_server(run, tmp_path / "run", interceptors=[DeviceTokenInterceptor(tokens)]) as (coord, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)

            def register(name, as_):
                md = (("x-device-id", as_), ("authorization", f"Bearer {tokens[name]}"))
                return stub.Register(pb.RegisterRequest(device_id=as_, model_fingerprint=coord.model_fingerprint,
                                                        tokenizer_fingerprint=coord.tokenizer_fingerprint),
                                     timeout=10, metadata=md)

            register("alpha", "alpha")
            assert "alpha" in coord.registry
            with pytest.raises(grpc.RpcError) as e:
                register("alpha", "bravo")  # alpha's token used as bravo
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "bravo" not in coord.registry


def test_a_token_is_found_with_one_comparison_whatever_the_fleets_size(monkeypatch):
    """The interceptor finds a token's owner by its digest and compares that one token in constant time: the
    work per call does not grow with the fleet (it compared every token: 0.6 ms a call at 10,000 devices). An
    unknown token, or a token that differs from a device's in its last character, has no owner."""
    import hmac

    import tomllib

    from edgelora.server import auth

    tokens = tomllib.loads(auth.make_tokens(range(5000)))["tokens"]
    interceptor = auth.DeviceTokenInterceptor(tokens)
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    for dev in ("0", "2500", "4999"):
        compared.clear()
        assert interceptor._owner(tokens[dev]) == dev
        assert len(compared) == 1
    near = tokens["7"][:-1] + ("A" if tokens["7"][-1] != "A" else "B")
    assert interceptor._owner(near) is None and interceptor._owner("x" * 43) is None and interceptor._owner("") is None
