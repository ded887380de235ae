"""Regenerate the committed protobuf/gRPC modules: `python -m edgelora.protos.generate`.

`--check` exits non-zero when regenerating would change the committed files (the drift test uses it).
The generator is pinned (grpcio-tools in pyproject's test extra), so the output is byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("edgelora_pb2.py", "edgelora_pb2_grpc.py", "edgelora_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}",
                      f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(HERE / "edgelora.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_mod = out_dir / "edgelora_pb2_grpc.py"
    # protoc emits an absolute import; the modules live inside the edgelora.protos package.
    text = re.sub(r"^import edgelora_pb2 as", "from . import edgelora_pb2 as", grpc_mod.read_text(), flags=re.M)
    grpc_mod.write_text(text)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    if not args.check:
        generate(HERE)
        print("generated", ", ".join(OUTPUTS))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = [n for n in OUTPUTS
                 if (Path(tmp) / n).read_text() != (HERE / n).read_text()]
    if drift:
        print("generated modules are stale, run `make protos`:", ", ".join(drift), file=sys.stderr)
        return 1
    print("protos up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
